"""`import umt` makes transformers' `AutoConfig` and `AutoModel` know the `umt` model type.

Registering needs transformers and the model code (seconds of imports), which every `umt`
command would pay. So `import umt` installs an import hook instead: the config registers right
after transformers' `configuration_auto` module is imported, the model right after
`modeling_auto`; whatever of them is imported already registers at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"


def register_config() -> None:
    from umt.hf_config import MODEL_TYPE, UMTConfig

    sys.modules[CONFIG_AUTO].AutoConfig.register(MODEL_TYPE, UMTConfig, exist_ok=True)


def register_model() -> None:
    """The real `UMTModel` when `umt.hf` is imported, else a stand-in that imports it when used:
    this runs inside transformers' imports, which `umt.model` itself may be in the middle of."""
    from umt.hf_config import UMTConfig

    register_config()
    hf = sys.modules.get("umt.hf")
    model = getattr(hf, "UMTModel", None) or _UMTModelOnFirstUse
    model.config_class = UMTConfig  # AutoModel.register checks it
    sys.modules[MODELING_AUTO].AutoModel.register(UMTConfig, model, exist_ok=True)


class _UMTModelOnFirstUse:
    """Stands for `umt.hf.UMTModel` in `AutoModel`'s table until a model is made."""

    @staticmethod
    def _real():
        from umt.hf import UMTModel  # registers the real class in place of this one

        return UMTModel

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls._real().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args, **kwargs):
        return cls._real()._from_config(*args, **kwargs)


def register_loaded() -> None:
    """Register with whichever of transformers' auto modules are imported already."""
    if CONFIG_AUTO in sys.modules:
        register_config()
    if MODELING_AUTO in sys.modules:
        register_model()


class _RegisterAfter(importlib.abc.Loader):
    """Runs the real loader, then registers."""

    def __init__(self, loader: importlib.abc.Loader, then):
        self.loader, self.then = loader, then

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        self.then()


class _AutoModulesHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        then = {CONFIG_AUTO: register_config, MODELING_AUTO: register_model}.get(name)
        if then is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisterAfter(spec.loader, then)
        return spec


def install() -> None:
    if not any(isinstance(f, _AutoModulesHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _AutoModulesHook())
    register_loaded()
