"""Miniatures of public datasets in the layout their publishers ship.

Each `make_<recipe>(root)` writes a few rows of the dataset's real metadata files (exact file
names, headers, JSON/YAML schemas, folder names as downloaded and extracted, with the awkward
bits real files have: BOMs, CRLF line ends, quoted fields holding commas, file names with spaces
and commas) plus tiny synthetic audio, and returns what a correct recipe must write:
`Expected.rows[(task, split)] = [(name, output, prompt or None), ...]` in order, and
`Expected.missing[(task, split)]` = the names listed in the metadata whose audio is absent.
The expected values are written out by hand here, not computed by recipe code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from megaflamingo.testing import write_audio

SR = 8000


@dataclass
class Expected:
    rows: dict = field(default_factory=dict)      # (task, split) -> [(name, output, prompt|None)]
    missing: dict = field(default_factory=dict)   # (task, split) -> [listed names]
    options: dict = field(default_factory=dict)   # options the recipe is run with


def wav(root: Path, rel: str, seconds: float = 1.1, seed: int = 0) -> str:
    """A short noise clip just above AF1's 16000-byte file floor (noise, so FLAC stays large)."""
    write_audio(root / rel, "white_noise", seconds, SR, seed=seed)
    return rel


def csv_text(lines: list[str], crlf: bool = False, bom: bool = False) -> bytes:
    text = ("\r\n" if crlf else "\n").join(lines) + ("\r\n" if crlf else "\n")
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")


# ------------------------------------------------------------------------------------ Clotho v2
def make_clotho_v2(root: Path) -> Expected:
    T = "Clotho-v2-AudioCaptioning"
    head = "file_name,caption_1,caption_2,caption_3,caption_4,caption_5"
    wav(root, "development/Distorted AM Radio noise.wav")
    wav(root, "development/rain, on a tin roof.wav", seed=1)
    (root / "clotho_captions_development.csv").write_bytes(csv_text([
        head,
        "Distorted AM Radio noise.wav,A radio hisses.,Static crackles loudly.,"
        "\"A man says \"\"hello\"\", then leaves.\",Noise fills the room.,A tuner is turned.",
        "\"rain, on a tin roof.wav\",Rain falls.,Rain patters on metal.,Water drips.,"
        "\"Rain, steady and calm.\",Drops hit a roof.",
    ], crlf=True, bom=True))
    wav(root, "validation/birds.wav", seed=2)
    (root / "clotho_captions_validation.csv").write_bytes(csv_text([
        head,
        "birds.wav,Birds chirp.,Birds sing.,Chirping birds.,Birds call out.,A bird tweets.",
        "gone missing.wav,a,b,c,d,e",
    ]))
    wav(root, "evaluation/door.wav", seed=3)
    (root / "clotho_captions_evaluation.csv").write_bytes(csv_text([
        head, "door.wav,A door creaks.,A door opens.,Hinges squeak.,Someone opens a door.,",
    ]))
    dev = ["A radio hisses.", "Static crackles loudly.", 'A man says "hello", then leaves.',
           "Noise fills the room.", "A tuner is turned."]
    rain = ["Rain falls.", "Rain patters on metal.", "Water drips.", "Rain, steady and calm.",
            "Drops hit a roof."]
    cap = "describe the sound in a sentence."
    return Expected(rows={
        (T, "train"): [("development/Distorted AM Radio noise.wav", c, cap) for c in dev]
        + [("development/rain, on a tin roof.wav", c, cap) for c in rain],
        (T, "val"): [("validation/birds.wav", c, cap) for c in
                     ["Birds chirp.", "Birds sing.", "Chirping birds.", "Birds call out.", "A bird tweets."]],
        (T, "test"): [("evaluation/door.wav", c, cap) for c in
                      ["A door creaks.", "A door opens.", "Hinges squeak.", "Someone opens a door."]],
    }, missing={(T, "val"): ["gone missing.wav"]})


# ------------------------------------------------------------------------------------ Clotho-AQA
def make_clotho_aqa(root: Path) -> Expected:
    T = "Clotho-AQA-AQA"
    head = "file_name,QuestionText,answer,confidence"
    wav(root, "audio_files/river bank, morning.wav")
    wav(root, "audio_files/traffic.wav", seed=1)
    (root / "clotho_aqa_train.csv").write_bytes(csv_text([
        head,
        "\"river bank, morning.wav\",Is there water flowing?,yes,yes",
        "\"river bank, morning.wav\",Is there water flowing?,yes,maybe",
        "\"river bank, morning.wav\",Is there water flowing?,no,no",
        "traffic.wav,\"What passes by, a car or a bike?\",car,yes",
        "absent.wav,Is it loud?,yes,yes",
    ], crlf=True, bom=True))
    (root / "clotho_aqa_val.csv").write_bytes(csv_text([head, "traffic.wav,Is it raining?,no,yes"]))
    (root / "clotho_aqa_test.csv").write_bytes(csv_text([head, "traffic.wav,How many cars?,two,maybe"]))
    q1 = "question: Is there water flowing?"
    return Expected(rows={
        (T, "train"): [("audio_files/river bank, morning.wav", "yes", q1),
                       ("audio_files/river bank, morning.wav", "yes", q1),
                       ("audio_files/river bank, morning.wav", "no", q1),
                       ("audio_files/traffic.wav", "car", "question: What passes by, a car or a bike?")],
        (T, "val"): [("audio_files/traffic.wav", "no", "question: Is it raining?")],
        (T, "test"): [("audio_files/traffic.wav", "two", "question: How many cars?")],
    }, missing={(T, "train"): ["absent.wav"]})


# ------------------------------------------------------------------------------------- AudioCaps
AUDIOCAPS_HEAD = "audiocap_id,youtube_id,start_time,caption"


def _audiocaps_csvs(root: Path) -> None:
    d = root / "dataset"
    d.mkdir(parents=True, exist_ok=True)
    (d / "train.csv").write_bytes(csv_text([
        AUDIOCAPS_HEAD,
        "91139,r1nicOVtvkQ,130,A woman talks and a baby whispers",
        "58146,UDGBjjwyaqE,20,\"Multiple clanging and clanking sounds, then silence\"",
        "11111,notThere001,0,Wind blows",
    ], crlf=True))
    (d / "val.csv").write_bytes(csv_text([
        AUDIOCAPS_HEAD,
        "97151,vfY_TJq7n_U,130,Rustling occurs",
        "97152,vfY_TJq7n_U,130,Leaves rustle in the wind",
        "97153,vfY_TJq7n_U,130,x",
    ]))
    (d / "test.csv").write_bytes(csv_text([AUDIOCAPS_HEAD, "103549,--0w1YA1Hm4,30,A vehicle drives by"]))


def make_audiocaps(root: Path) -> Expected:
    """Clips as `audio/<split>/<youtube_id>.wav` (val saved as `valid/`, as some tools do):
    the default pattern `{youtube_id}.*` finds them by name."""
    T = "audiocaps-AudioCaptioning"
    _audiocaps_csvs(root)
    wav(root, "audio/train/r1nicOVtvkQ.wav")
    wav(root, "audio/train/UDGBjjwyaqE.flac", seed=1)
    wav(root, "audio/valid/vfY_TJq7n_U.wav", seed=2)
    wav(root, "audio/test/--0w1YA1Hm4.wav", seed=3)
    cap = "describe the sound in a sentence."
    return Expected(rows={
        (T, "train"): [("audio/train/r1nicOVtvkQ.wav", "A woman talks and a baby whispers", cap),
                       ("audio/train/UDGBjjwyaqE.flac", "Multiple clanging and clanking sounds, then silence", cap)],
        (T, "val"): [("audio/valid/vfY_TJq7n_U.wav", "Rustling occurs", cap),
                     ("audio/valid/vfY_TJq7n_U.wav", "Leaves rustle in the wind", cap)],
        (T, "test"): [("audio/test/--0w1YA1Hm4.wav", "A vehicle drives by", cap)],
    }, missing={(T, "train"): ["notThere001.*"]})


def make_audiocaps_with_start(root: Path) -> Expected:
    """Clips named `<youtube_id>_<start_time>.wav` in one flat folder."""
    T = "audiocaps-AudioCaptioning"
    _audiocaps_csvs(root)
    for i, (yid, st) in enumerate([("r1nicOVtvkQ", 130), ("UDGBjjwyaqE", 20), ("vfY_TJq7n_U", 130),
                                   ("--0w1YA1Hm4", 30)]):
        wav(root, f"clips/{yid}_{st}.wav", seed=i)
    cap = "describe the sound in a sentence."
    return Expected(rows={
        (T, "train"): [("clips/r1nicOVtvkQ_130.wav", "A woman talks and a baby whispers", cap),
                       ("clips/UDGBjjwyaqE_20.wav", "Multiple clanging and clanking sounds, then silence", cap)],
        (T, "val"): [("clips/vfY_TJq7n_U_130.wav", "Rustling occurs", cap),
                     ("clips/vfY_TJq7n_U_130.wav", "Leaves rustle in the wind", cap)],
        (T, "test"): [("clips/--0w1YA1Hm4_30.wav", "A vehicle drives by", cap)],
    }, missing={(T, "train"): ["notThere001_0.wav"]},
        options={"audio_pattern": "{youtube_id}_{start_time}.wav"})


# ---------------------------------------------------------------------------------------- ESC-50
def make_esc50(root: Path) -> Expected:
    T = "ESC50-EventClassification"
    (root / "meta").mkdir(parents=True)
    (root / "meta/esc50.csv").write_bytes(csv_text([
        "filename,fold,target,category,esc10,src_file,take",
        "1-100032-A-0.wav,1,0,dog,True,100032,A",
        "1-100038-A-14.wav,1,14,chirping_birds,False,100038,A",
        "2-102414-C-17.wav,2,17,pouring_water,False,102414,C",
        "5-9032-A-0.wav,5,0,dog,True,9032,A",
    ]))
    for i, f in enumerate(["1-100032-A-0.wav", "1-100038-A-14.wav", "2-102414-C-17.wav"]):
        wav(root, f"audio/{f}", seed=i)
    p = "classify this sound."
    return Expected(rows={(T, "test"): [("audio/1-100032-A-0.wav", "dog", p),
                                        ("audio/1-100038-A-14.wav", "chirping birds", p),
                                        ("audio/2-102414-C-17.wav", "pouring water", p)]},
                    missing={(T, "test"): ["5-9032-A-0.wav"]})


# ---------------------------------------------------------------------------------- UrbanSound8K
def make_urbansound8k(root: Path) -> Expected:
    T = "UrbanSound8K-EventClassification"
    (root / "metadata").mkdir(parents=True)
    (root / "metadata/UrbanSound8K.csv").write_bytes(csv_text([
        "slice_file_name,fsID,start,end,salience,fold,classID,class",
        "100032-3-0-0.wav,100032,0.0,0.317551,1,5,3,dog_bark",
        "100263-2-0-117.wav,100263,58.5,62.5,1,5,2,children_playing",
        "101729-0-0-1.wav,101729,0.5,4.5,2,10,0,air_conditioner",
        "99999-1-0-0.wav,99999,0.0,4.0,1,3,1,car_horn",
    ], crlf=True))
    wav(root, "audio/fold5/100032-3-0-0.wav")
    wav(root, "audio/fold5/100263-2-0-117.wav", seed=1)
    wav(root, "audio/fold10/101729-0-0-1.wav", seed=2)
    p = "classify this sound."
    return Expected(rows={(T, "test"): [("audio/fold5/100032-3-0-0.wav", "dog bark", p),
                                        ("audio/fold5/100263-2-0-117.wav", "children playing", p),
                                        ("audio/fold10/101729-0-0-1.wav", "air conditioner", p)]},
                    missing={(T, "test"): ["99999-1-0-0.wav"]})


# ----------------------------------------------------------------------------------------- GTZAN
def make_gtzan(root: Path) -> Expected:
    import soundfile as sf

    from megaflamingo.testing import synth_audio
    T = "GTZAN-GenreClassification"
    for rel in ["genres/blues/blues.00000.au", "genres/hiphop/hiphop.00007.au",
                "genres/rock/rock.00099.au"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(root / rel), synth_audio("tone", 0.2, 22050), 22050, format="AU", subtype="PCM_16")
    (root / "genres/rock/README.txt").write_text("not audio")
    (root / "genres/input.mf").write_text("list")
    p = "what is the genre of this music?"
    return Expected(rows={(T, "test"): [("genres/blues/blues.00000.au", "blues", p),
                                        ("genres/hiphop/hiphop.00007.au", "hiphop", p),
                                        ("genres/rock/rock.00099.au", "rock", p)]})


# ---------------------------------------------------------------------------------------- NSynth
def _note(key, family, source, pitch, velocity, qualities):
    return {"note": 1, "note_str": key, "instrument": 3, "instrument_str": key.rsplit("-", 2)[0],
            "pitch": pitch, "velocity": velocity, "sample_rate": 16000,
            "qualities": [1 if q in qualities else 0 for q in range(10)],
            "qualities_str": qualities, "instrument_family": 0, "instrument_family_str": family,
            "instrument_source": 1, "instrument_source_str": source}


def make_nsynth(root: Path) -> Expected:
    train = {"guitar_acoustic_001-082-050": _note("guitar_acoustic_001-082-050", "guitar", "acoustic",
                                                  82, 50, ["bright", "percussive"]),
             "synth_lead_000-060-127": _note("synth_lead_000-060-127", "synth_lead", "synthetic", 60, 127, []),
             "bass_electronic_018-022-025": _note("bass_electronic_018-022-025", "bass", "electronic",
                                                  22, 25, ["dark"])}
    test = {"keyboard_electronic_001-021-127": _note("keyboard_electronic_001-021-127", "keyboard",
                                                     "electronic", 21, 127, ["fast_decay"])}
    for folder, notes, present in (("nsynth-train", train, ["guitar_acoustic_001-082-050",
                                                            "synth_lead_000-060-127"]),
                                   ("nsynth-test", test, list(test))):
        (root / folder).mkdir(parents=True)
        (root / folder / "examples.json").write_text(json.dumps(notes, indent=4))
        for i, k in enumerate(present):
            wav(root, f"{folder}/audio/{k}.wav", seed=i)
    g, s, k = ("nsynth-train/audio/guitar_acoustic_001-082-050.wav",
               "nsynth-train/audio/synth_lead_000-060-127.wav",
               "nsynth-test/audio/keyboard_electronic_001-021-127.wav")
    mir, ins, src, qua = ("this music note is produced by", "what is the instrument of this music?",
                          "what is the source of this music?", "what are the qualities of the music?")
    bass = ["bass_electronic_018-022-025.wav"]
    return Expected(rows={
        ("NSynth-MIR", "train"): [(g, "acoustic guitar, pitch 82, velocity 50, bright, percussive", mir),
                                  (s, "synthetic synth_lead, pitch 60, velocity 127", mir)],
        ("NSynth-MIR", "test"): [(k, "electronic keyboard, pitch 21, velocity 127, fast_decay", mir)],
        ("NSynth-InstrClassification", "train"): [(g, "guitar", ins), (s, "synth_lead", ins)],
        ("NSynth-InstrClassification", "test"): [(k, "keyboard", ins)],
        ("NSynth-SourceClassification", "train"): [(g, "acoustic", src), (s, "synthetic", src)],
        ("NSynth-SourceClassification", "test"): [(k, "electronic", src)],
        ("NSynth-QualityClassification", "train"): [(g, "bright, percussive", qua)],
        ("NSynth-QualityClassification", "test"): [(k, "fast_decay", qua)],
    }, missing={(t, "train"): bass for t in ("NSynth-MIR", "NSynth-InstrClassification",
                                              "NSynth-SourceClassification", "NSynth-QualityClassification")})


# --------------------------------------------------------------------------------- CREMA-D, RAVDESS
def make_crema_d(root: Path) -> Expected:
    T = "CREMA-D-EmotionClassification"
    for i, f in enumerate(["1001_DFA_ANG_XX.wav", "1001_IEO_HAP_HI.wav", "1091_WSI_DIS_LO.wav"]):
        wav(root, f"AudioWAV/{f}", seed=i)
    (root / "processedResults").mkdir()
    (root / "processedResults/summaryTable.csv").write_text("Unnamed: 0,FileName,VoiceVote\n0,1001_DFA_ANG_XX,A\n")
    p = "what is the emotion of this speech?"
    return Expected(rows={(T, "test"): [("AudioWAV/1001_DFA_ANG_XX.wav", "angry", p),
                                        ("AudioWAV/1001_IEO_HAP_HI.wav", "happy", p),
                                        ("AudioWAV/1091_WSI_DIS_LO.wav", "disgusted", p)]})


def make_ravdess(root: Path) -> Expected:
    T = "ravdess-EmotionClassification"
    files = ["Actor_01/03-01-01-01-01-01-01.wav", "Actor_01/03-01-07-02-02-01-01.wav",
             "Actor_24/03-01-08-01-01-02-24.wav", "Actor_24/03-02-05-01-01-01-24.wav",
             "Actor_24/01-01-05-01-01-01-24.wav"]
    for i, f in enumerate(files):
        wav(root, f, seed=i)
    p = "what is the emotion of this speech?"
    return Expected(rows={(T, "test"): [("Actor_01/03-01-01-01-01-01-01.wav", "neutral", p),
                                        ("Actor_01/03-01-07-02-02-01-01.wav", "disgusted", p),
                                        ("Actor_24/03-01-08-01-01-02-24.wav", "surprised", p)]})


# ---------------------------------------------------------------------------------------- FSD50K
def make_fsd50k(root: Path) -> Expected:
    T = "FSD50k-EventClassification"
    gt = root / "FSD50K.ground_truth"
    gt.mkdir(parents=True)
    (gt / "dev.csv").write_bytes(csv_text([
        "fname,labels,mids,split",
        '64760,"Electric_guitar,Guitar,Plucked_string_instrument,Musical_instrument,Music",'
        '"/m/02sgy,/m/0342h,/m/0fx80y,/m/04szw,/m/04rlf",train',
        '16399,"Bass_drum,Drum,Percussion",/m/0bm02,val',
        '1000,"Bark,Dog",/m/05tny_,train',
    ], crlf=True))
    (gt / "eval.csv").write_bytes(csv_text(["fname,labels,mids", '37199,"Chewing_and_mastication,Human_voice",/m/03cczk']))
    wav(root, "FSD50K.dev_audio/64760.wav")
    wav(root, "FSD50K.dev_audio/16399.wav", seed=1)
    wav(root, "FSD50K.eval_audio/37199.wav", seed=2)
    p = "describe this sound in the order from specific to general."
    return Expected(rows={
        (T, "train"): [("FSD50K.dev_audio/64760.wav",
                        "Electric guitar, Guitar, Plucked string instrument, Musical instrument, Music", p)],
        (T, "val"): [("FSD50K.dev_audio/16399.wav", "Bass drum, Drum, Percussion", p)],
        (T, "test"): [("FSD50K.eval_audio/37199.wav", "Chewing and mastication, Human voice", p)],
    }, missing={(T, "train"): ["1000.wav"]})


# ------------------------------------------------------------------------------------ CochlScene
def make_cochlscene(root: Path) -> Expected:
    T = "CochlScene-SceneClassification"
    files = [("Train/Bus/Bus_user0001_14615.wav", "bus"),
             ("Train/CrowdedIndoor/CrowdedIndoor_user0002_1.wav", "crowdedindoor"),
             ("Val/ResidentialArea/ResidentialArea_user0100_7.wav", "residentialarea"),
             ("Test/SubwayStation/SubwayStation_user0200_3.wav", "subwaystation")]
    for i, (f, _) in enumerate(files):
        wav(root, f"CochlScene/{f}", seed=i)
    p = "this acoustic scene is"
    return Expected(rows={(T, "train"): [(f"CochlScene/{f}", lab, p) for f, lab in files[:2]],
                          (T, "val"): [(f"CochlScene/{files[2][0]}", files[2][1], p)],
                          (T, "test"): [(f"CochlScene/{files[3][0]}", files[3][1], p)]})


# ------------------------------------------------------------------------------------------ MACS
def make_macs(root: Path) -> Expected:
    T = "MACS-AudioCaptioning"
    (root / "MACS.yaml").write_text(
        "files:\n"
        "- filename: airport-barcelona-0-0-a.wav\n"
        "  annotations:\n"
        "  - annotator_id: 1\n"
        "    sentence: adults talking and footsteps, in a big hall\n"
        "    tags: [adults_talking, footsteps]\n"
        "  - annotator_id: 7\n"
        "    sentence: people walk by while an announcement plays\n"
        "    tags: [announcement_jingle]\n"
        "- filename: park-helsinki-241-7018-a.wav\n"
        "  annotations:\n"
        "  - annotator_id: 3\n"
        "    sentence: birds singing\n"
        "    tags: [birds_singing]\n", encoding="utf-8")
    wav(root, "TAU-urban-acoustic-scenes-2019-development/audio/airport-barcelona-0-0-a.wav")
    p = "describe the sound in a sentence."
    a = "TAU-urban-acoustic-scenes-2019-development/audio/airport-barcelona-0-0-a.wav"
    return Expected(rows={(T, "train"): [(a, "adults talking and footsteps, in a big hall", p),
                                         (a, "people walk by while an announcement plays", p)]},
                    missing={(T, "train"): ["park-helsinki-241-7018-a.wav"]})


# --------------------------------------------------------------------------------------- WavCaps
def make_wavcaps(root: Path) -> Expected:
    def write(source, fname, rows):
        d = root / "json_files" / source
        d.mkdir(parents=True, exist_ok=True)
        (d / fname).write_text(json.dumps({"num_captions_per_audio": 1, "data": rows}))
    write("AudioSet_SL", "as_final.json", [
        {"id": "Yb0RFKhbpFJA.wav", "caption": "Wind and a man speaking are heard.", "audio": "wav_path",
         "duration": 10.0},
        {"id": "YmissingAAAA.wav", "caption": "Gone.", "audio": "wav_path", "duration": 10.0}])
    write("FreeSound", "fsd_final.json", [
        {"id": "2229", "file_name": "UK Mello.wav", "href": "x", "tags": ["synth"], "description": "d",
         "author": "a", "duration": 3.5, "download_link": "x", "caption": "A synth melody plays.",
         "audio": "wav_path"}])
    write("SoundBible", "sb_final.json", [
        {"title": "Bell", "description": "d", "author": "a", "href": "x", "caption": "A bell rings.",
         "id": "2229", "duration": 1.25, "audio": "wav_path", "download_link": "x"}])
    write("BBC_Sound_Effects", "bbc_final.json", [
        {"id": "07070255", "description": "d", "category": "['Nature']", "caption": "Waves crash.",
         "audio": "wav_path", "download_link": "x", "duration": 60.0}])
    base = "waveforms"
    for i, rel in enumerate(["AudioSet_SL_flac/Yb0RFKhbpFJA.flac", "FreeSound_flac/2229.flac",
                             "SoundBible_flac/2229.flac", "BBC_Sound_Effects_flac/07070255.flac"]):
        write_audio(root / base / rel, "white_noise", 1.1, SR, seed=i)
    p = "describe the sound in a sentence."
    return Expected(rows={
        ("WavCaps-AudioSet_SL-AudioCaptioning", "train"):
            [(f"{base}/AudioSet_SL_flac/Yb0RFKhbpFJA.flac", "Wind and a man speaking are heard.", p)],
        ("WavCaps-FreeSound-AudioCaptioning", "train"): [(f"{base}/FreeSound_flac/2229.flac", "A synth melody plays.", p)],
        ("WavCaps-SoundBible-AudioCaptioning", "train"): [(f"{base}/SoundBible_flac/2229.flac", "A bell rings.", p)],
        ("WavCaps-BBC_Sound_Effects-AudioCaptioning", "train"):
            [(f"{base}/BBC_Sound_Effects_flac/07070255.flac", "Waves crash.", p)],
    }, missing={("WavCaps-AudioSet_SL-AudioCaptioning", "train"): ["YmissingAAAA.flac"]})


# ------------------------------------------------------------------------------------- MusicCaps
def make_musiccaps(root: Path) -> Expected:
    T = "MusicCaps-AudioCaptioning"
    (root / "musiccaps-public.csv").write_bytes(csv_text([
        "ytid,start_s,end_s,audioset_positive_labels,aspect_list,caption,author_id,is_balanced_subset,is_audioset_eval",
        "-0Gj8-vB1q4,30,40,\"/m/0140xf,/m/02cjck\",\"['low quality', 'sustained strings melody']\","
        "\"The low quality recording features a ballad song,\nwith sustained strings.\",4,False,True",
        "-0SdAVK79lg,30,40,/m/0155w,\"['guitar song', 'piano']\",\"This is a guitar song, calm.\",0,False,False",
        "-0vPFx-wRRI,30,40,/m/025_jnm,\"['pop']\",A pop song.,6,False,False",
    ], crlf=True, bom=True))
    wav(root, "clips/-0Gj8-vB1q4.wav")
    wav(root, "clips/-0SdAVK79lg.wav", seed=1)
    p = "describe the music in a paragraph."
    return Expected(rows={
        (T, "test"): [("clips/-0Gj8-vB1q4.wav", "The low quality recording features a ballad song, with sustained strings.", p)],
        (T, "train"): [("clips/-0SdAVK79lg.wav", "This is a guitar song, calm.", p)],
    }, missing={(T, "train"): ["-0vPFx-wRRI.*"]})


# ------------------------------------------------------------------------------- Medley-solos-DB
def make_medley_solos_db(root: Path) -> Expected:
    T = "Medley-solos-DB-InstrClassification"
    (root / "Medley-solos-DB_metadata.csv").write_bytes(csv_text([
        "subset,instrument,instrument_id,song_id,uuid4",
        "test,clarinet,0,0,0e4371ac-1c6a-51ab-fdb7-f8abd5fbf1a3",
        "training,distorted electric guitar,1,12,33e9f5b8-0b43-4e0c-d8f9-4b96ee7cb8a4",
        "validation,female singer,2,50,c6b6a1d2-44a6-5a69-f1a3-9a1f3b3fd2b9",
        "training,piano,4,77,ffffffff-0000-0000-0000-000000000000",
    ]))
    files = ["Medley-solos-DB_test-0_0e4371ac-1c6a-51ab-fdb7-f8abd5fbf1a3.wav",
             "Medley-solos-DB_training-1_33e9f5b8-0b43-4e0c-d8f9-4b96ee7cb8a4.wav",
             "Medley-solos-DB_validation-2_c6b6a1d2-44a6-5a69-f1a3-9a1f3b3fd2b9.wav"]
    for i, f in enumerate(files):
        wav(root, f"Medley-solos-DB/{f}", seed=i)
    p = "what is the instrument of this music?"
    return Expected(rows={
        (T, "test"): [(f"Medley-solos-DB/{files[0]}", "clarinet", p)],
        (T, "train"): [(f"Medley-solos-DB/{files[1]}", "distorted electric guitar", p)],
        (T, "val"): [(f"Medley-solos-DB/{files[2]}", "female singer", p)],
    }, missing={(T, "train"): ["Medley-solos-DB_training-4_ffffffff-0000-0000-0000-000000000000.wav"]})


# ------------------------------------------------------------------------------------ MUSIC-AVQA
def make_music_avqa(root: Path) -> Expected:
    d = root / "data/json"
    d.mkdir(parents=True)
    train = [
        {"video_id": "00000272", "question_id": 19, "type": "[\"Audio\", \"Counting\"]",
         "question_content": "How many musical instruments were heard throughout the video?",
         "templ_values": "[]", "question_deleted": 0, "anser": "two"},
        {"video_id": "00000272", "question_id": 20, "type": "[\"Audio-Visual\", \"Temporal\"]",
         "question_content": "Where is the first sounding instrument?", "templ_values": "[]",
         "question_deleted": 0, "anser": "left"},
        {"video_id": "00000273", "question_id": 21, "type": "[\"Audio\", \"Comparative\"]",
         "question_content": "Is the <Object> louder than the <Object>?",
         "templ_values": "['cello', 'violin']", "question_deleted": 0, "anser": "yes"},
        {"video_id": "00000272", "question_id": 22, "type": "[\"Visual\", \"Counting\"]",
         "question_content": "Is there a <Object> in the entire video?", "templ_values": "['piano']",
         "question_deleted": 0, "anser": "no"},
        {"video_id": "00009999", "question_id": 23, "type": "[\"Audio\", \"Counting\"]",
         "question_content": "Is there a voiceover?", "templ_values": "[]", "question_deleted": 0,
         "anser": "no"},
    ]
    (d / "avqa-train.json").write_text(json.dumps(train))
    (d / "avqa-val.json").write_text(json.dumps(train[:1]))
    wav(root, "audio/00000272.wav")
    wav(root, "audio/00000273.flac", seed=1)
    A, AV = "Music-AVQA-AQA_All", "Music-AVQA-AVQA_All"
    q19 = "question: How many musical instruments were heard throughout the video?"
    q21 = "question: Is the cello louder than the violin?"
    return Expected(rows={
        (A, "train"): [("audio/00000272.wav", "two", q19), ("audio/00000273.flac", "yes", q21)],
        (AV, "train"): [("audio/00000272.wav", "two", q19),
                        ("audio/00000272.wav", "left", "question: Where is the first sounding instrument?"),
                        ("audio/00000273.flac", "yes", q21)],
        (A, "val"): [("audio/00000272.wav", "two", q19)],
        (AV, "val"): [("audio/00000272.wav", "two", q19)],
    }, missing={(A, "train"): ["00009999.*"], (AV, "train"): ["00009999.*"]})


MINIATURES = {
    "clotho-v2": make_clotho_v2, "clotho-aqa": make_clotho_aqa, "audiocaps": make_audiocaps,
    "esc50": make_esc50, "urbansound8k": make_urbansound8k, "gtzan": make_gtzan,
    "nsynth": make_nsynth, "crema-d": make_crema_d, "ravdess": make_ravdess,
    "fsd50k": make_fsd50k, "cochlscene": make_cochlscene, "macs": make_macs,
    "wavcaps": make_wavcaps, "musiccaps": make_musiccaps, "medley-solos-db": make_medley_solos_db,
    "music-avqa": make_music_avqa,
}
