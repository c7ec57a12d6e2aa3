"""What a TensorRT build is asked for (`TrtOptions`), the builder flags each component gets, and its builder config.

Flag selection is pure Python (`builder_flags`), so it is tested without TensorRT; `make_config`
turns the names into `trt.BuilderFlag` members through one table (`builder_flag_table`), where
every member our code can set is written out, so the API-surface test checks each of them.

Per component (tensorrt.md §1-2):
- every DiT expert: `WEIGHT_STREAMING` (a 14B expert runs inside a VRAM budget; needs a strongly
  typed network, which every network we make is);
- `--version-compatible`: `VERSION_COMPATIBLE` + `EXCLUDE_LEAN_RUNTIME` on every component (the
  inference box needs only `tensorrt-lean`, whose runtime carries what the plan leaves out);
- `--refittable`: `REFIT` on the DiT experts (LoRAs change only the DiT; the other components stay
  non-refittable, which keeps their plans as fast as possible), `--strip-plan` adds `STRIP_PLAN`.
No precision flag is ever set: precision comes from the graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from wanrt.engines.errors import WanrtError
from wanrt.engines.plans import ProfileShapes
from wanrt.plugins_trt.kernels import PRECISIONS

OPT_LEVELS = range(0, 6)
ATTENTIONS = ("native", "plugin")
ATTENTION_PRECISIONS = PRECISIONS  # the plugin's QK^T formats


@dataclass(frozen=True)
class TrtOptions:
    """The `build-engine` options that shape a TensorRT plan (all of them enter its build key)."""

    opt_level: int = 3  # builder_optimization_level 0-5 (TensorRT's default 3)
    version_compatible: bool = False
    refittable: bool = False
    strip_plan: bool = False  # STRIP_PLAN: needs refittable; the plan's weights come from the bundle's ONNX at load
    timing_cache: Path | None = None  # None: beside the build cache (`cache.default_timing_cache`)
    attention: str = "native"
    plugin_dir: Path | None = None  # the folder `plugin-build` wrote; None with attention "plugin": built for this GPU
    attention_precision: str = "bf16"  # the plugin's QK^T precision (`plugins_trt.kernels.PRECISIONS`)
    workspace_bytes: int | None = None  # WORKSPACE pool limit; None: TensorRT's default (the GPU's memory)

    def check(self) -> None:
        """WanrtError naming the option when the combination cannot be built."""
        if self.opt_level not in OPT_LEVELS:
            raise WanrtError(f"--opt-level {self.opt_level}: expected 0..5 (TensorRT's builder optimization level; default 3)")
        if self.strip_plan and not self.refittable:
            raise WanrtError("--strip-plan: a stripped plan gets its weights by refitting, so it needs --refittable")
        if self.strip_plan and self.version_compatible:
            raise WanrtError("--strip-plan with --version-compatible: tensorrt-lean has no refitter to give a stripped plan its "
                             "weights, and the full tensorrt does not run plans without their lean runtime; drop one")  # fmt: skip
        if self.attention not in ATTENTIONS:
            raise WanrtError(f"--attention {self.attention!r}: expected one of {', '.join(ATTENTIONS)}")
        if self.attention == "native" and self.plugin_dir is not None:
            raise WanrtError("--plugin DIR is used only with --attention plugin")
        if self.attention_precision not in ATTENTION_PRECISIONS:
            raise WanrtError(f"--attention-precision {self.attention_precision!r}: expected one of {', '.join(ATTENTION_PRECISIONS)}")
        if self.attention == "native" and self.attention_precision != "bf16":
            raise WanrtError(f"--attention-precision {self.attention_precision}: the plugin's QK^T precision; it needs --attention plugin")

    def key_fields(self) -> dict:
        """What of these options enters a plan's build key (not the timing cache's path: it changes no plan)."""
        return {"opt_level": self.opt_level, "version_compatible": self.version_compatible, "refittable": self.refittable,
                "strip_plan": self.strip_plan, "attention": self.attention, "workspace_bytes": self.workspace_bytes,
                **({"attention_precision": self.attention_precision} if self.attention == "plugin" else {})}  # fmt: skip


def builder_flags(kind: str, options: TrtOptions) -> list[str]:
    """The `trt.BuilderFlag` member names a component of `kind` is built with (see the module docstring)."""
    flags = []
    if kind == "dit":
        flags.append("WEIGHT_STREAMING")
        if options.refittable:
            flags.append("REFIT")
            if options.strip_plan:
                flags.append("STRIP_PLAN")
    if options.version_compatible:
        flags += ["VERSION_COMPATIBLE", "EXCLUDE_LEAN_RUNTIME"]
    return flags


def builder_flag_table(trt) -> dict[str, "trt.BuilderFlag"]:
    """Every builder flag `builder_flags` can name, as TensorRT's enum member."""
    return {
        "WEIGHT_STREAMING": trt.BuilderFlag.WEIGHT_STREAMING,
        "REFIT": trt.BuilderFlag.REFIT,
        "STRIP_PLAN": trt.BuilderFlag.STRIP_PLAN,
        "VERSION_COMPATIBLE": trt.BuilderFlag.VERSION_COMPATIBLE,
        "EXCLUDE_LEAN_RUNTIME": trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME,
    }


def add_profiles(builder: "trt.Builder", config: "trt.IBuilderConfig", profiles: list[ProfileShapes]) -> None:
    """One optimization profile per `ProfileShapes`: (min, opt, max) of every dynamic input."""
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)


def load_timing_cache(config: "trt.IBuilderConfig", data: bytes) -> "trt.ITimingCache":
    """A timing cache from `data` (b"": empty) attached to `config`; a mismatched cache (other GPU/TensorRT) is refused."""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):
        cache = config.create_timing_cache(b"")  # a cache of another GPU or TensorRT: start afresh, it is saved over
        config.set_timing_cache(cache, False)
    return cache


def make_config(trt, builder: "trt.Builder", flags: list[str], options: TrtOptions, profiles: list[ProfileShapes],
                timing_cache: bytes) -> "trt.IBuilderConfig":  # fmt: skip
    """The builder config of one component: optimization level, flags, profiles, timing cache, activation resizing."""
    from .api import enable_activation_resize

    config = builder.create_builder_config()
    config.builder_optimization_level = options.opt_level
    table = builder_flag_table(trt)
    for name in flags:
        config.set_flag(table[name])
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    add_profiles(builder, config, profiles)
    load_timing_cache(config, timing_cache)
    enable_activation_resize(trt, config)
    return config


def serialized_timing_cache(config: "trt.IBuilderConfig") -> bytes:
    """The config's timing cache after a build, as bytes to save."""
    return bytes(memoryview(config.get_timing_cache().serialize()))
