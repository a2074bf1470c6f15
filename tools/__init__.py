"""tools: thin CLIs over megaflamingo.checkpoint (`megaflamingo-convert`, `python -m tools`)."""
