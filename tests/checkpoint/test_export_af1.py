"""export / af1-import / af1-export on the real (tiny) AudioFlamingo: same logits, exact AF1 round trip."""
import json

import pytest
import torch

from megaflamingo.checkpoint import load_state_dict
from megaflamingo.checkpoint.model_dir import load_model_dir
from megaflamingo.checkpoint.integrity import CheckpointError
from megaflamingo.checkpoint.source import from_state_dict
from megaflamingo.checkpoint.split import write_sharded
from megaflamingo.compat import af1
from megaflamingo.cli.convert import main as cli

from tests.checkpoint.ckpt_helpers import TINY_CONFIG, assert_same, build_tiny_model, logits, tiny_batch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    (d / "config.yaml").write_text(TINY_CONFIG)
    model, tok, ids = build_tiny_model(d / "config.yaml")
    return d, model, ids


def test_export_then_inference_load_gives_same_logits(trained, tmp_path):
    run, model, ids = trained
    batch = tiny_batch(model, ids)
    want = logits(model, batch)
    # a consolidated checkpoint next to the run's config (what zero-to-fp32 leaves in a run dir)
    write_sharded(from_state_dict(model.state_dict()), run / "fp32", 40_000, progress=False, log=lambda m: None)
    out = tmp_path / "export"
    assert cli(["export", str(run / "fp32"), str(out), "--max-shard-size", "100KB", "--no-progress"]) == 0
    conf = json.loads((out / "config.json").read_text())
    # the Hugging Face layout: our model section apart, the LM's config sized to the tokenizer
    assert conf["model_type"] == "megaflamingo" and conf["architectures"] == ["AudioFlamingo"]
    assert conf["weights"] == "full" and conf["flamingo"]["audio_embed_dim"] == 16
    assert conf["text_config"]["model_type"] == "opt"
    assert conf["text_config"]["vocab_size"] == model.lang_encoder.get_input_embeddings().num_embeddings
    assert conf["token_ids"] == ids.as_dict() and "model" not in conf["megaflamingo"]
    assert (out / "tokenizer.json").is_file()
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(idx["metadata"]["files"]) > 1
    assert idx["metadata"]["tied_weights"] == {"lang_encoder.lm_head.weight": "lang_encoder.model.decoder.embed_tokens.weight"}
    # our one-call loader
    loaded = load_model_dir(out).model
    assert torch.equal(logits(loaded.eval(), batch), want)
    # the inference front end's loader
    from megaflamingo.inference.load import load_model

    lm = load_model(out)
    assert torch.equal(logits(lm.model, batch), want)


def test_model_dirs_are_hugging_face_model_dirs(trained, tmp_path):
    """What export writes, transformers loads (registered auto classes, the tokenizer beside it); what
    save_pretrained writes (any max_shard_size), our loader and transformers load again."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaflamingo.model import AudioFlamingo

    run, model, ids = trained
    batch = tiny_batch(model, ids)
    want = logits(model, batch)
    write_sharded(from_state_dict(model.state_dict()), run / "fp32h", None, progress=False, log=lambda m: None)
    out = tmp_path / "export"
    assert cli(["export", str(run / "fp32h"), str(out), "--max-shard-size", "100KB", "--no-progress"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf) is AudioFlamingo and hf.lang_encoder.config._attn_implementation == "sdpa"
    assert torch.equal(logits(hf.eval(), batch), want)
    emb, head = hf.lang_encoder.get_input_embeddings().weight, hf.lang_encoder.get_output_embeddings().weight
    assert emb.data_ptr() == head.data_ptr()  # OPT's lm_head stays tied to the embedding
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == emb.shape[0] and tok.convert_tokens_to_ids("<audio>") == ids.media

    saved = tmp_path / "saved"
    hf.save_pretrained(saved, max_shard_size="50KB")
    assert len(list(saved.glob("model-*.safetensors"))) > 2
    again = AudioFlamingo.from_pretrained(saved)
    assert torch.equal(logits(again.eval(), batch), want)
    tok.save_pretrained(saved)
    assert torch.equal(logits(load_model_dir(saved).model, batch), want)

    # strict: a missing weight is an error, never a silently random tensor
    from safetensors.torch import save_file

    for f in [*saved.glob("model-*.safetensors"), saved / "model.safetensors.index.json"]:
        f.unlink()
    sd = {k: v.contiguous() for k, v in again.state_dict().items() if k != "lang_encoder.lm_head.weight"}
    gate = next(k for k in sd if k.endswith("attn_gate"))
    save_file({k: v for k, v in sd.items() if k != gate}, str(saved / "model.safetensors"), {"format": "pt"})
    with pytest.raises(ValueError, match=f"missing keys \\(1\\): {gate}"):
        AudioFlamingo.from_pretrained(saved)


def test_trainable_only_dirs_and_format_1_dirs_still_load(trained, tmp_path):
    """A trainable-only export has no LM: from_pretrained says so (load_model_dir takes the LM from
    model.lm, which a random-init tiny LM does not have: it refuses). A format-1 config.json (before
    the HF layout) still reads."""
    from megaflamingo.checkpoint.model_dir import ModelLoadError, read_config
    from megaflamingo.model import AudioFlamingo

    run, model, ids = trained
    write_sharded(from_state_dict(model.state_dict()), run / "fp32t", None, progress=False, log=lambda m: None)
    out = tmp_path / "tr"
    assert cli(["export", str(run / "fp32t"), str(out), "--trainable-only", "--no-progress"]) == 0
    with pytest.raises(ValueError, match="trainable-only"):
        AudioFlamingo.from_pretrained(out)
    with pytest.raises(ModelLoadError, match="missing"):
        load_model_dir(out)
    v2 = json.loads((out / "config.json").read_text())
    v1 = {"architecture": "megaflamingo.AudioFlamingo", "format_version": 1, "weights": "full",
          "megaflamingo": dict(v2["megaflamingo"], model=v2["flamingo"]), "token_ids": v2["token_ids"]}
    (tmp_path / "v1.json").write_text(json.dumps(v1))
    assert read_config(tmp_path / "v1.json").model == read_config(out).model


def test_trainable_only_export(trained, tmp_path):
    run, model, _ = trained
    write_sharded(from_state_dict(model.state_dict()), run / "fp32b", None, progress=False, log=lambda m: None)
    out = tmp_path / "tr"
    assert cli(["export", str(run / "fp32b"), str(out), "--trainable-only", "--no-progress"]) == 0
    sd = load_state_dict(out)
    assert sd and all(k.startswith("audio_transformer.") or ".gated_cross_attn_layer." in k for k in sd)
    want = {k for k in model.state_dict() if k.startswith("audio_transformer.") or ".gated_cross_attn_layer." in k}
    assert set(sd) == want
    assert json.loads((out / "config.json").read_text())["weights"] == "trainable"


def test_export_rejects_keys_not_matching_config(trained, tmp_path):
    run, model, _ = trained
    sd = dict(model.state_dict())
    sd["audio_transformer.bogus"] = torch.zeros(2)
    write_sharded(from_state_dict(sd), run / "bad1", None, progress=False, log=lambda m: None)
    with pytest.raises(CheckpointError, match=r"audio_transformer\.bogus"):
        from megaflamingo.checkpoint.export import export

        export(run / "bad1", tmp_path / "o1", progress=False)
    sd = dict(model.state_dict())
    k = "audio_transformer.layer_norm.weight" if "audio_transformer.layer_norm.weight" in sd else \
        next(k for k in sd if k.startswith("audio_transformer.") and k.endswith("weight"))
    sd[k] = torch.zeros(3)
    write_sharded(from_state_dict(sd), run / "bad2", None, progress=False, log=lambda m: None)
    assert cli(["export", str(run / "bad2"), str(tmp_path / "o2"), "--no-progress"]) == 2
    assert not (tmp_path / "o2").exists()


def _af1_parts(model, d, n=5):
    """AF1's release layout: {'model_state_dict'} with module. prefixes, aliases and clap.* in n parts."""
    sd = {"module." + k: v for k, v in af1.export_state_dict(model).items()}
    g = torch.Generator().manual_seed(3)
    sd["module.clap.audio_encoder.proj.weight"] = torch.randn(6, 4, generator=g)
    keys = list(sd)
    d.mkdir()
    for i in range(n):
        torch.save({"model_state_dict": {k: sd[k] for k in keys[i::n]}}, d / f"foundation_part{i + 1}.pt")
    torch.save({"model_state_dict": sd}, d.parent / "foundation.pt")
    return sd


def test_af1_import_export_round_trip_exact(trained, tmp_path):
    run, model, ids = trained
    sd = _af1_parts(model, tmp_path / "parts")
    batch = tiny_batch(model, ids)
    want = logits(model, batch)
    cfg = str(run / "config.yaml")
    for src, name in ((tmp_path / "parts", "from_parts"), (tmp_path / "foundation.pt", "from_file")):
        out = tmp_path / name
        assert cli(["af1-import", str(src), str(out), "--config", cfg, "--no-progress"]) == 0
        loaded = load_model_dir(out).model
        assert torch.equal(logits(loaded.eval(), batch), want)
    # af1-export: AF1 key names (aliases + clap) and the very same tensors
    assert cli(["af1-export", str(tmp_path / "from_parts"), str(tmp_path / "chat.pt"), "--no-progress"]) == 0
    back = torch.load(tmp_path / "chat.pt", weights_only=True)["model_state_dict"]
    assert_same({k[len("module."):]: v for k, v in sd.items()}, back)
    # the exported file (no module. prefix) imports again to the same model
    assert cli(["af1-import", str(tmp_path / "chat.pt"), str(tmp_path / "again"), "--config", cfg, "--no-progress"]) == 0
    assert torch.equal(logits(load_model_dir(tmp_path / "again").model.eval(), batch), want)
    a = back["lang_encoder.old_decoder_blocks.1.fc1.weight"]
    assert a.data_ptr() == back["lang_encoder.model.decoder.layers.1.decoder_layer.fc1.weight"].data_ptr()
    # ... also as AF1 parts, merged by plain dict update
    assert cli(["af1-export", str(tmp_path / "from_file"), str(tmp_path / "xparts"), "--max-size", "120KB",
                "--name", "chat", "--no-progress"]) == 0
    merged = {}
    parts = sorted((tmp_path / "xparts").glob("chat_part*.pt"))
    assert len(parts) >= 2
    for p in parts:
        merged.update(torch.load(p, weights_only=True)["model_state_dict"])
    assert_same(back, merged)


def test_af1_import_errors(trained, tmp_path):
    run, model, _ = trained
    _af1_parts(model, tmp_path / "parts")
    cfg = str(run / "config.yaml")
    (tmp_path / "parts" / "foundation_part3.pt").unlink()
    assert cli(["af1-import", str(tmp_path / "parts"), str(tmp_path / "o"), "--config", cfg]) == 2
    with pytest.raises(CheckpointError, match="foundation_part3.pt"):
        from megaflamingo.checkpoint.export import af1_import

        af1_import(tmp_path / "parts", tmp_path / "o", cfg, progress=False)
    # a checkpoint of another shape: the error names the key
    other = tmp_path / "other.yaml"
    other.write_text(TINY_CONFIG.replace("d_inner: 32", "d_inner: 48"))
    with pytest.raises(ValueError, match=r"shape mismatch: audio_transformer\.layer_stack"):
        af1_import(tmp_path / "foundation.pt", tmp_path / "o2", other, progress=False)
    assert not (tmp_path / "o2").exists()


def test_push_to_hub_uploads_a_loadable_model_dir(trained, tmp_path, monkeypatch):
    """push_to_hub (transformers' own, on top of save_pretrained) with the hub replaced by a folder:
    what would be uploaded loads back as the same model."""
    import shutil

    from huggingface_hub import HfApi
    from transformers import AutoModelForCausalLM

    run, model, ids = trained
    uploaded = tmp_path / "hub" / "me" / "tiny-af"

    class Repo:
        repo_id = "me/tiny-af"

    def create_commit(self, repo_id, operations, **kw):
        uploaded.mkdir(parents=True)
        for op in operations:
            shutil.copyfile(op.path_or_fileobj, uploaded / op.path_in_repo)

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: Repo())
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    model.push_to_hub("me/tiny-af", max_shard_size="50KB")
    assert len(list(uploaded.glob("model-*.safetensors"))) > 2 and (uploaded / "config.json").is_file()
    batch = tiny_batch(model, ids)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(uploaded).eval(), batch), logits(model, batch))
