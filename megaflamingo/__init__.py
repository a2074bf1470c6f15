"""megaflamingo: Audio Flamingo training, inference and data preparation at scale.

Importing the package registers the model with transformers' auto classes (``model_type``
"megaflamingo"), so ``AutoModelForCausalLM.from_pretrained(model_dir)`` loads an exported model.
That costs the torch + transformers import once per process; every entry point but the
pure-Python preprocessing steps needs them anyway.
"""
from megaflamingo.model import flamingo as _flamingo  # noqa: F401  (registers the auto classes)
