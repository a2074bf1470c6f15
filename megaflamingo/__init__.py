"""megaflamingo: Audio Flamingo training, inference and data preparation at scale.

Importing the package registers the model with transformers' auto classes (``model_type``
"megaflamingo"), so ``AutoModelForCausalLM.from_pretrained(model_dir)`` loads an exported model.
The registration needs torch and transformers, which preprocessing steps and their decoding
workers never import: it happens now if transformers is already imported, else right after it is.
"""
import sys


def _register_with_transformers() -> None:
    try:
        from megaflamingo.model import flamingo  # noqa: F401  (importing it registers the auto classes)
    except ImportError:  # transformers without torch: there is no model to register
        pass


class _RegisterAfterTransformersImport:
    """A one-shot import hook: runs the registration once ``transformers`` has been imported."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(cls)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _register_with_transformers()

            spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_with_transformers()
elif _RegisterAfterTransformersImport not in sys.meta_path:
    sys.meta_path.insert(0, _RegisterAfterTransformersImport)
