"""Inference front ends (`megaflamingo-infer`): foundation prompts, chat, retrieval-augmented few-shot
and batch JSONL. Modules: load (model dirs / DeepSpeed / AF1 checkpoints), embed (audio -> window
embeddings, preprocessing's front end), prompts (AF1 text formats), runner (batching + generation),
chat, retrieval, batch, metrics, cli."""
