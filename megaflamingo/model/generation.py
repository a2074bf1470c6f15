"""Generation for AudioFlamingo: greedy, sampling (temperature / top-k / top-p) and beam search.

* KV cache: the LM's own cache object (DynamicCache), reordered for beams with ``reorder_cache``.
* Media cache: the audio transformer runs once per call; each xattn layer's K/V of the media are
  memoised in the call's MediaContext (never on modules).
* Semantics equal the uncached path exactly: every new token's visible audio range is computed from
  the number of ``<audio>`` tokens in the whole sequence so far (AF1's cached generation let new tokens
  see audio 0 only; fixed). ``use_cache=False`` recomputes the full sequence every step (reference path).
* Left padding (required when rows differ in length); position ids follow the attention mask, as HF does.
* Beam search is batched (B > 1) and follows HF's vectorised beam search (length_penalty, the default
  ``early_stopping=False`` heuristic), without Python loops over the batch.
Returns prompt + generated ids, like HF ``generate``; rows that stop early are padded with ``pad_token_id``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .injection import MEDIA_KWARG


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits / temperature
    if top_k and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(logits, dim=-1, descending=True)
        probs = srt.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


class _Stepper:
    """Runs the LM on the new tokens (cached) or on the whole sequence (uncached)."""

    def __init__(self, model, media, audio_mask, use_cache: bool):
        self.model, self.media, self.audio_mask, self.use_cache = model, media, audio_mask, use_cache
        self.past = None
        self.kv_memo = {} if use_cache else None

    def __call__(self, seqs: torch.Tensor, attention_mask: torch.Tensor, n_new: int) -> torch.Tensor:
        m = self.model
        if self.use_cache and self.past is not None:
            new = seqs[:, -n_new:]
            count_before = (seqs[:, :-n_new] == m.media_token_id).sum(-1)
        else:
            new, count_before = seqs, None
        ctx = m.media_context(new, self.media, self.audio_mask, count_before, self.kv_memo)
        pos = _positions(attention_mask)[:, -new.shape[1]:]
        out = m.lang_encoder(
            input_ids=new, attention_mask=attention_mask, position_ids=pos,
            past_key_values=self.past if self.use_cache else None, use_cache=self.use_cache,
            logits_to_keep=1, **{MEDIA_KWARG: ctx},
        )
        if self.use_cache:
            self.past = out.past_key_values
        return out.logits[:, -1].float()

    def reorder(self, idx: torch.Tensor) -> None:
        if self.past is not None:
            self.past.reorder_cache(idx)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    audio_embeds: Optional[torch.Tensor] = None,
    audio_mask: Optional[torch.Tensor] = None,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    eos_token_id: Union[int, Sequence[int], None] = None,
    pad_token_id: Optional[int] = None,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    synced_gpus: Optional[bool] = None,
) -> torch.Tensor:
    """``synced_gpus``: keep every rank stepping until all ranks are done (needed under ZeRO-3, where each
    forward gathers parameters collectively); None = on when ZeRO-3-partitioned params are present."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if not bool((attention_mask[:, -1] != 0).all()):
        rows = (attention_mask[:, -1] == 0).nonzero().flatten().tolist()
        raise ValueError(f"generation needs LEFT padding: row(s) {rows} end with padding")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    count = torch.cumsum((input_ids == model.media_token_id).long(), dim=1)
    audio_mask = model.validate_inputs(input_ids, audio_embeds, audio_mask, count)
    if eos_token_id is None:
        eos_token_id = model.eoc_token_id
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                       device=input_ids.device, dtype=torch.long)
    if pad_token_id is None:  # eos_token_id=[] disables stopping (always max_new_tokens)
        pad_token_id = model.tokens.pad
    attention_mask = attention_mask.long()
    if synced_gpus is None:
        synced_gpus = _zero3_distributed(model)
    media = model.encode_audio(audio_embeds)
    if num_beams == 1:
        step = _Stepper(model, media, audio_mask, use_cache)
        return _sample_or_greedy(step, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k,
                                 top_p, eos, pad_token_id, generator, synced_gpus)
    step = _Stepper(model, media.repeat_interleave(num_beams, 0), audio_mask.repeat_interleave(num_beams, 0),
                    use_cache)
    return _beam_search(step, input_ids, attention_mask, max_new_tokens, num_beams, length_penalty, do_sample,
                        temperature, top_k, top_p, eos, pad_token_id, generator, synced_gpus)


def _zero3_distributed(model) -> bool:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return any(hasattr(p, "ds_id") for p in model.parameters())


def _all_done(local_done: bool, synced: bool, device) -> bool:
    """Stop only when every rank is done (ranks that finished keep stepping on padding)."""
    if not synced:
        return local_done
    flag = torch.tensor([0.0 if local_done else 1.0], device=device)
    torch.distributed.all_reduce(flag)
    return flag.item() == 0.0


def _sample_or_greedy(step, seqs, am, max_new, do_sample, temperature, top_k, top_p, eos, pad, generator, synced):
    B = seqs.shape[0]
    done = torch.zeros(B, dtype=torch.bool, device=seqs.device)
    logits = step(seqs, am, seqs.shape[1])
    for i in range(max_new):
        if do_sample:
            probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            tok = logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad), tok)
        seqs = torch.cat([seqs, tok[:, None]], 1)
        am = torch.cat([am, am.new_ones(B, 1)], 1)
        done = done | torch.isin(tok, eos)
        if i == max_new - 1 or _all_done(bool(done.all()), synced, seqs.device):
            break
        logits = step(seqs, am, 1)
    return seqs


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [B, N, ...], idx [B, M] -> [B, M, ...]."""
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.ndim - 2))).expand(*idx.shape, *t.shape[2:]))


def _beam_search(step, input_ids, am, max_new, K, length_penalty, do_sample, temperature, top_k, top_p, eos, pad,
                 generator, synced):
    B, T0 = input_ids.shape
    dev = input_ids.device
    max_len = T0 + max_new
    n_keep = max(2, 1 + eos.numel()) * K
    top_mask = torch.arange(n_keep, device=dev) < K
    running = torch.full((B, K, max_len), pad, dtype=torch.long, device=dev)
    running[:, :, :T0] = input_ids[:, None]
    finished = running.clone()
    fin_scores = torch.full((B, K), -1e9, device=dev)
    fin_len = torch.full((B, K), T0, dtype=torch.long, device=dev)
    is_fin = torch.zeros(B, K, dtype=torch.bool, device=dev)
    run_scores = torch.zeros(B, K, device=dev)
    run_scores[:, 1:] = -1e9
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    am = am.repeat_interleave(K, 0)
    flat_base = (torch.arange(B, device=dev) * K)[:, None]

    cur = T0
    logits = step(running[:, :, :cur].reshape(B * K, cur), am, cur)
    while True:
        logp = F.log_softmax(logits, -1)
        if do_sample:  # as HF: warpers act on each beam's token log-probs, before adding beam scores
            logp = filter_logits(logp, temperature, top_k, top_p)
        V = logp.shape[-1]
        logp = (logp.view(B, K, V) + run_scores[..., None]).view(B, K * V)
        if do_sample:
            idx = torch.multinomial(logp.softmax(-1), n_keep, generator=generator)
            top_lp = logp.gather(1, idx)
        else:
            top_lp, idx = torch.topk(logp, n_keep, dim=-1)
        src, tok = idx // V, idx % V
        cand = _gather(running, src)
        cand[:, :, cur] = tok
        hits = torch.isin(tok, eos) | (cur + 1 >= max_len)

        # beams that keep running: best K candidates that did not stop
        run_lp = top_lp + hits.float() * -1e9
        nxt = torch.topk(run_lp, K, dim=-1).indices
        running, run_scores, run_src = _gather(cand, nxt), _gather(run_lp, nxt), _gather(src, nxt)

        # finished hypotheses: only candidates ranked in the top K may finish; keep the best K overall
        just = hits & top_mask[None]
        fin_lp = top_lp / float(cur + 1 - T0) ** length_penalty
        fin_lp = fin_lp + (~improvable).float() * -1e9 + (~just).float() * -1e9
        m_seq = torch.cat([finished, cand], 1)
        m_score = torch.cat([fin_scores, fin_lp], 1)
        m_len = torch.cat([fin_len, torch.full_like(tok, cur + 1)], 1)
        m_fin = torch.cat([is_fin, just], 1)
        best = torch.topk(m_score, K, dim=-1).indices
        finished, fin_scores, fin_len, is_fin = (_gather(t, best) for t in (m_seq, m_score, m_len, m_fin))

        cur += 1
        best_run = run_scores[:, :1] / float(cur - T0) ** length_penalty
        worst_fin = torch.where(is_fin, fin_scores.min(1, keepdim=True).values, torch.full_like(fin_scores, -1e9))
        improvable = improvable & (best_run > worst_fin).any(-1, keepdim=True)
        if bool(hits.all()):  # max length: the same step on every rank
            break
        if _all_done(not bool(improvable.any()), synced, dev):
            break
        flat_src = (run_src + flat_base).view(-1)
        step.reorder(flat_src)
        am = torch.cat([am[flat_src], am.new_ones(B * K, 1)], 1)
        logits = step(running[:, :, :cur].reshape(B * K, cur), am, 1)

    out_len = int(fin_len[:, 0].max())
    return finished[:, 0, :out_len]
