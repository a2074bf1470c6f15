"""Training engine on DeepSpeed: config merging (ds_config), optimizer groups and schedules (optim),
the loop (trainer.Trainer), checkpoints (checkpointing), metrics/MFU (metrics, flops), launcher
discovery (distributed, slurm), model/data assembly (build, run) and the CLI (cli: ``megaflamingo-train``).
Submodules are imported on use so ``import megaflamingo.engine`` stays light (no deepspeed import)."""
