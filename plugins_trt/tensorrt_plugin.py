"""Register our attention plugin with TensorRT, so its ONNX parser maps `wanrt::WanAttention` nodes
to our kernels and the built plan carries them (Quickly Deployable Plugins, ahead of time).

A TensorRT build imports this module and calls `register_plugin(plugin_dir, precision)` before
parsing (network created with `NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS`).  The
definitions, for plugin id "wanrt::WanAttention" (the node's op_type and plugin_namespace; QDP
creators are version "1", the node's plugin_version):

- `register`: q, k, v -> one output shaped and typed like q; attribute `scale` (float, from the
  node; TensorRT's parser passes the node attributes the creator declares);
- `autotune`: per I/O dtype the plugin folder has kernels for (all four tensors the same dtype,
  LINEAR), tactics 1..n = the folder's tile candidates in order; TensorRT times them;
- `aot_impl`: the PTX of the chosen (dtype, head_dim, tactic) kernel, its launch (grid
  (cdiv(Sq, block_m), B*heads), num_warps*32 threads, its shared memory) and its int32 scalars
  (the bits of float32 scale*log2(e), baked at build time since QDP passes only integers; Sq;
  Sk).  The plan then holds the kernel and runs in a plain TensorRT runtime, no Python.

No `impl` (JIT) is defined: a plan that needed Python at run time would defeat the point.  The
module does not use `from __future__ import annotations`: QDP validates the decorated functions'
annotations as objects.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from wanrt.engines.errors import WanrtError

from .aot import arch_name, detect_gpu_arch, kernel_table, read_plugin
from .kernels import qk_scale_bits
from .onnx_op import OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"
QDP_PLUGIN_VERSION = "1"  # tensorrt.plugin registers every creator as version "1"
# Triton dtype name -> the name AutoTuneCombination uses (trt.DataType member names, FP32/FP16 short forms).
AUTOTUNE_TYPES = {"fp32": "FP32", "fp16": "FP16", "bf16": "BF16"}
PORTABLE_SHARED_BYTES = 49152  # what a launch gets without opting into more shared memory


class PluginRegistrationError(WanrtError):
    """The plugin cannot be registered as asked."""


@dataclass(frozen=True)
class Registration:
    """What was registered in this process: which kernels answer for the plugin id."""

    plugin_id: str
    precision: str
    arch: int
    plugin_dir: str
    table: Dict[Tuple[str, int], List[Dict[str, Any]]]  # (dtype, head_dim) -> kernel records, tactic order
    ptx: Dict[str, bytes]  # record's ptx path -> PTX text

    def tactics(self, dtype: str) -> List[int]:
        """Tactic ids offered for `dtype`: 1..max over its head sizes (a head size with fewer repeats its last)."""
        counts = [len(records) for (d, _), records in self.table.items() if d == dtype]
        return list(range(1, max(counts) + 1)) if counts else []

    def select(self, dtype: str, head_dim: int, tactic: int) -> Dict[str, Any]:
        """The kernel record for a (dtype, head_dim, tactic) TensorRT asks for."""
        records = self.table.get((dtype, head_dim))
        if not records:
            have = sorted(self.table)
            raise ValueError(f"{PLUGIN_ID}: no {self.precision} kernel for {dtype} inputs with head size {head_dim} "
                             f"on {arch_name(self.arch)} in {self.plugin_dir} (it has {have}); run plugin-build for it")
        return records[min(max(tactic, 1), len(records)) - 1]


# TensorRT's plugin registry is per process, and so is this record of what we put in it.
_REGISTERED: Dict[str, Registration] = {}


def load_registration(plugin_dir, precision: str = "bf16", arch: Optional[int] = None,
                      max_shared_bytes: Optional[int] = None) -> Registration:
    """The kernels of a plugin folder for one precision and architecture (default: the GPU's), without TensorRT."""
    plugin_dir = Path(plugin_dir)
    if arch is None:
        arch = detect_gpu_arch()
        if arch is None:
            raise PluginRegistrationError("no GPU found to choose the plugin's kernels for; pass arch=")
    description = read_plugin(plugin_dir)
    if description["plugin"] != {"name": OP_TYPE, "version": PLUGIN_VERSION, "namespace": PLUGIN_NAMESPACE}:
        raise PluginRegistrationError(f"{plugin_dir}: plugin {description['plugin']} is not the node's "
                                      f"({OP_TYPE} v{PLUGIN_VERSION} in {PLUGIN_NAMESPACE!r})")
    table = kernel_table(description, arch, precision)
    if max_shared_bytes is not None:
        table = {key: [r for r in records if r["shared_bytes"] <= max_shared_bytes] for key, records in table.items()}
        empty = sorted(key for key, records in table.items() if not records)
        if empty:
            raise PluginRegistrationError(f"{plugin_dir}: no kernel within {max_shared_bytes} bytes of shared memory for {empty}")
    ptx = {r["ptx"]: (plugin_dir / r["ptx"]).read_bytes() for records in table.values() for r in records}
    return Registration(PLUGIN_ID, precision, arch, str(plugin_dir), table, ptx)


def register_plugin(plugin_dir, precision: str = "bf16", arch: Optional[int] = None, lazy: bool = False,
                    max_shared_bytes: Optional[int] = None) -> Registration:
    """Define the plugin with `tensorrt.plugin` (once per process) and return what answers for it.

    `lazy=True` defers TensorRT's creator registration to the first `tensorrt.plugin.op` use (the
    ONNX parser cannot find a lazy plugin; it is for checking the definitions without a builder).
    `max_shared_bytes=PORTABLE_SHARED_BYTES` offers only kernels a launch can run without opting
    into more shared memory.
    """
    registration = load_registration(plugin_dir, precision, arch, max_shared_bytes)
    previous = _REGISTERED.get(PLUGIN_ID)
    if previous is not None:
        if (previous.precision, previous.arch, previous.plugin_dir) == (precision, registration.arch, registration.plugin_dir):
            return previous
        raise PluginRegistrationError(
            f"{PLUGIN_ID} is already registered in this process for {previous.precision} on {arch_name(previous.arch)} "
            f"from {previous.plugin_dir}; TensorRT keeps one definition per process, so build other precisions in another process")
    if PLUGIN_VERSION != QDP_PLUGIN_VERSION:
        raise PluginRegistrationError(f"the node asks for plugin version {PLUGIN_VERSION!r}; tensorrt.plugin registers {QDP_PLUGIN_VERSION!r}")
    _define(registration, lazy)
    _REGISTERED[PLUGIN_ID] = registration
    return registration


def _define(registration: Registration, lazy: bool) -> None:
    """The three QDP definitions, answering from `registration`."""
    import tensorrt as trt
    import tensorrt.plugin as trtp

    dtype_names = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}
    dtypes = sorted({dtype for dtype, _ in registration.table})

    @trtp.register(PLUGIN_ID, lazy_register=lazy)
    def wan_attention(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, scale: float) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(PLUGIN_ID)
    def wan_attention_autotune(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc,
                               outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(",".join([AUTOTUNE_TYPES[dtype]] * 4), "LINEAR", registration.tactics(dtype))
                for dtype in dtypes]

    @trtp.aot_impl(PLUGIN_ID)
    def wan_attention_aot_impl(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, scale: float, outputs: Tuple[trtp.TensorDesc], tactic: int
    ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        head = q.shape_expr[3]
        if not head.is_constant:
            raise ValueError(f"{PLUGIN_ID}: the head size must be fixed at build time")
        record = registration.select(dtype_names.get(q.dtype, str(q.dtype)), head.constant_value(), tactic)
        seq_q, seq_k = q.shape_expr[2], k.shape_expr[2]
        launch = trtp.KernelLaunchParams()
        launch.grid_x = trtp.cdiv(seq_q, record["tile"]["block_m"])
        launch.grid_y = q.shape_expr[0] * q.shape_expr[1]
        launch.block_x = record["num_warps"] * 32
        launch.shared_mem = record["shared_bytes"]
        scalars = trtp.SymIntExprs.from_tuple([trtp.SymInt32(qk_scale_bits(scale)), trtp.SymInt32(seq_q), trtp.SymInt32(seq_k)])
        return record["kernel_name"], registration.ptx[record["ptx"]], launch, scalars
