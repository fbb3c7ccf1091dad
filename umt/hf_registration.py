"""`import umt` makes transformers' auto classes know the `umt` model type: `AutoConfig`,
`AutoModel`, `AutoImageProcessor` and `AutoProcessor` load an export with UMT's own code (no
`trust_remote_code` needed; without UMT, the code the export carries runs instead).

Registering needs transformers and the model code (seconds of imports), which every `umt`
command would pay. So `import umt` installs an import hook instead: each registers right after
transformers' auto module for it is imported; whatever of them is imported already registers at
once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

CONFIG_AUTO = "transformers.models.auto.configuration_auto"
MODELING_AUTO = "transformers.models.auto.modeling_auto"
IMAGE_PROCESSING_AUTO = "transformers.models.auto.image_processing_auto"
PROCESSING_AUTO = "transformers.models.auto.processing_auto"


def register_config() -> None:
    from umt.model.hf_config import MODEL_TYPE, UMTConfig

    sys.modules[CONFIG_AUTO].AutoConfig.register(MODEL_TYPE, UMTConfig, exist_ok=True)


def register_model() -> None:
    """The real `UMTModel` when `umt.model.hf_model` is imported, else a stand-in that imports
    it when used: this runs inside transformers' imports, which `umt.model` itself may be in the
    middle of."""
    from umt.model.hf_config import UMTConfig

    register_config()
    hf = sys.modules.get("umt.model.hf_model")
    model = getattr(hf, "UMTModel", None) or _UMTModelOnFirstUse
    model.config_class = UMTConfig  # AutoModel.register checks it
    sys.modules[MODELING_AUTO].AutoModel.register(UMTConfig, model, exist_ok=True)


class _UMTModelOnFirstUse:
    """Stands for `umt.model.hf_model.UMTModel` in `AutoModel`'s table until a model is made."""

    @staticmethod
    def _real():
        from umt.model.hf_model import UMTModel

        register_model()  # the real class in place of this one
        return UMTModel

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        return cls._real().from_pretrained(*args, **kwargs)

    @classmethod
    def _from_config(cls, *args, **kwargs):
        return cls._real()._from_config(*args, **kwargs)


def register_image_processor() -> None:
    from umt.model.hf_config import UMTConfig
    from umt.model.hf_processing import UMTImageProcessor

    register_config()
    auto = sys.modules[IMAGE_PROCESSING_AUTO].AutoImageProcessor
    auto.register(UMTConfig, slow_image_processor_class=UMTImageProcessor, exist_ok=True)


def register_processor() -> None:
    from umt.model.hf_config import UMTConfig
    from umt.model.hf_processing import UMTProcessor

    register_config()
    sys.modules[PROCESSING_AUTO].AutoProcessor.register(UMTConfig, UMTProcessor, exist_ok=True)


REGISTER_AFTER = {
    CONFIG_AUTO: register_config,
    MODELING_AUTO: register_model,
    IMAGE_PROCESSING_AUTO: register_image_processor,
    PROCESSING_AUTO: register_processor,
}


def register_loaded() -> None:
    """Register with whichever of transformers' auto modules are imported already."""
    for module, register in REGISTER_AFTER.items():
        if module in sys.modules:
            register()


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
        then = REGISTER_AFTER.get(name)
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
