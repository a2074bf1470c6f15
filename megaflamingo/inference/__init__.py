"""Inference (`megaflamingo-infer`, `megaflamingo-demo`): foundation prompts, chat, retrieval-augmented
few-shot, batch JSONL, AF1's LAION-CLAP re-ranking and the web demo. Modules: load (model dirs /
DeepSpeed / AF1 checkpoints), embed (audio -> window embeddings, preprocessing's front end), prompts
(AF1 text formats), runner (batching + generation), chat, retrieval + fewshot (kNN examples), batch,
metrics, rerank (sampling several answers, LAION-CLAP scores), service (a loaded model serving
requests), uploads (checks of user audio), views (spectrogram), demo (the Gradio app)."""
