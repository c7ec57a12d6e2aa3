"""Real test bundles for the runtime: small ONNX graphs built with onnx.helper, run by real ONNX Runtime.

Each graph computes a simple known function, so a test can recompute in numpy what the
runtime should produce:

    DiT      noise_pred = a*latent[:, :out] + b*t/1000 + c*mean(context) + e*mean_c(latent[:, out:])
                          + d*mean(clip_fea)     (+ 0 * sum(padding weights), to give the file a size)
    text     context[b, l] = table[input_ids[b, l]] * attention_mask[b, l]
    CLIP     clip_fea = reshape(mean_hw(pixel_values) @ W, [B, tokens, width])
    VAE      (`engines.vae_contract`, no caches) decoder: video chunk = tanh(latent[:, :3]) repeated
             over the chunk's frames and upsampled (nearest) by the spatial stride; encoder: latent =
             mean of the chunk over channels, frames and each stride x stride block, times VAE_GAINS

with different (a, b, c, d, e) per expert (`DIT_COEFFS`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from wanrt.engines.manifest import Component, Manifest, write_manifest
from wanrt.engines.model import AnimateConfig, DiTConfig, SamplingDefaults, VAEInfo
from wanrt.engines.signatures import (
    EngineSignature, animate_dit_signature, dit_signature, image_encoder_signature, text_encoder_signature,
)
from wanrt.engines.vae_contract import VAEChunkContract

OPSET = 17
TEXT_DIM = 8
CLIP_WIDTH = 6
FACE_SIZE = 8  # Animate test bundles: face crops of 8x8 pixels
VOCAB = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "runs", "in", "snow", "cat", "the", "bad", "blurry"]
# (a, b, c, d, e) per DiT component
DIT_COEFFS = {
    "dit": (0.8, 0.5, 1.5, 0.25, 0.3),
    "dit_high_noise": (0.9, 0.6, 2.0, 0.35, 0.4),
    "dit_low_noise": (0.6, -0.4, 1.2, -0.2, 0.7),
}


@dataclasses.dataclass(frozen=True)
class DitFn:
    """The numpy twin of a test DiT graph."""

    a: float
    b: float
    c: float
    d: float
    e: float
    out_dim: int

    def __call__(self, latent, timestep, context, clip_fea=None, pose_latent=None, face_pixels=None):
        out = self.a * latent[:, : self.out_dim]
        t = timestep.astype(np.float64) / 1000.0
        t = t.reshape(t.shape[0], 1, -1, 1, 1)  # [B] -> [B,1,1,1,1], [B,F] -> [B,1,F,1,1]
        out = out + self.b * t
        out = out + self.c * context.mean(axis=(1, 2)).reshape(-1, 1, 1, 1, 1)
        if latent.shape[1] > self.out_dim:
            out = out + self.e * latent[:, self.out_dim :].mean(axis=1, keepdims=True)
        if clip_fea is not None:
            out = out + self.d * clip_fea.mean(axis=(1, 2)).reshape(-1, 1, 1, 1, 1)
        for x in (pose_latent, face_pixels):  # Animate: each adds d * its mean
            if x is not None:
                out = out + self.d * x.mean(axis=(1, 2, 3, 4)).reshape(-1, 1, 1, 1, 1)
        return out.astype(np.float32)


def dit_fn(name: str, out_dim: int) -> DitFn:
    return DitFn(*DIT_COEFFS[name], out_dim=out_dim)


def _value_info(spec) -> onnx.ValueInfoProto:
    elem = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "bool": TensorProto.BOOL}[spec.dtype]
    return helper.make_tensor_value_info(spec.name, elem, [d if isinstance(d, int) else d for d in spec.shape])


def _const(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def save_graph(graph: onnx.GraphProto, onnx_path: Path) -> list[Path]:
    """Save with the initializers (all but tiny shape constants) in one external `model.onnx.data`, as real bundles are."""
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    data_name = onnx_path.name + ".data"
    onnx.save_model(model, str(onnx_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=128)  # fmt: skip
    return [p for p in (onnx_path, onnx_path.with_name(data_name)) if p.exists()]


def build_dit_graph(path: Path, sig: EngineSignature, dit: str, out_dim: int, pad_floats: int = 64) -> list[Path]:
    a, b, c, d, e = DIT_COEFFS[dit]
    names = sig.input_names
    in_dim = sig.input("latent").shape[1]
    per_frame = len(sig.input("timestep").shape) == 2
    nodes, inits = [], [
        _const("a", np.float32(a)), _const("b", np.float32(b / 1000.0)), _const("c", np.float32(c)),
        _const("d", np.float32(d)), _const("e", np.float32(e)), _const("zero", np.float32(0.0)),
        _const("starts", np.array([0], np.int64)), _const("ends", np.array([out_dim], np.int64)),
        _const("cond_ends", np.array([in_dim], np.int64)), _const("axis1", np.array([1], np.int64)),
        _const("shape5", np.array([-1, 1, 1, 1, 1], np.int64)), _const("ts_axes", np.array([1, 3, 4], np.int64)),
        _const("pad", np.linspace(-1, 1, pad_floats, dtype=np.float32)),
    ]  # fmt: skip
    nodes += [
        helper.make_node("Slice", ["latent", "starts", "ends", "axis1"], ["noise"]),
        helper.make_node("Mul", ["noise", "a"], ["t1"]),
        helper.make_node("Mul", ["timestep", "b"], ["tb"]),
        helper.make_node("Unsqueeze", ["tb", "ts_axes"], ["t2"]) if per_frame
        else helper.make_node("Reshape", ["tb", "shape5"], ["t2"]),
        helper.make_node("ReduceMean", ["context"], ["ctx_mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Reshape", ["ctx_mean", "shape5"], ["ctx5"]),
        helper.make_node("Mul", ["ctx5", "c"], ["t3"]),
        helper.make_node("ReduceSum", ["pad"], ["pad_sum"], keepdims=0),
        helper.make_node("Mul", ["pad_sum", "zero"], ["t0"]),
        helper.make_node("Add", ["t1", "t2"], ["s1"]),
        helper.make_node("Add", ["s1", "t3"], ["s2"]),
        helper.make_node("Add", ["s2", "t0"], ["s3"]),
    ]  # fmt: skip
    last = "s3"
    if in_dim > out_dim:
        nodes += [
            helper.make_node("Slice", ["latent", "ends", "cond_ends", "axis1"], ["cond"]),
            helper.make_node("ReduceMean", ["cond"], ["cond_mean"], axes=[1], keepdims=1),
            helper.make_node("Mul", ["cond_mean", "e"], ["t4"]),
            helper.make_node("Add", [last, "t4"], ["s4"]),
        ]
        last = "s4"
    if "clip_fea" in names:
        nodes += [
            helper.make_node("ReduceMean", ["clip_fea"], ["clip_mean"], axes=[1, 2], keepdims=0),
            helper.make_node("Reshape", ["clip_mean", "shape5"], ["clip5"]),
            helper.make_node("Mul", ["clip5", "d"], ["t5"]),
            helper.make_node("Add", [last, "t5"], ["s5"]),
        ]
        last = "s5"
    for extra in ("pose_latent", "face_pixels"):  # Animate
        if extra in names:
            nodes += [
                helper.make_node("ReduceMean", [extra], [f"{extra}_mean"], axes=[1, 2, 3, 4], keepdims=0),
                helper.make_node("Reshape", [f"{extra}_mean", "shape5"], [f"{extra}5"]),
                helper.make_node("Mul", [f"{extra}5", "d"], [f"{extra}_t"]),
                helper.make_node("Add", [last, f"{extra}_t"], [f"{extra}_s"]),
            ]
            last = f"{extra}_s"
    nodes.append(helper.make_node("Identity", [last], ["noise_pred"]))
    graph = helper.make_graph(
        nodes, dit, [_value_info(s) for s in sig.inputs], [_value_info(s) for s in sig.outputs], inits
    )
    return save_graph(graph, path)


def text_table(dim: int = TEXT_DIM) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((len(VOCAB), dim)).astype(np.float32)


def build_text_graph(path: Path, sig: EngineSignature) -> list[Path]:
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "last_axis"], ["mask3"]),
        helper.make_node("Mul", ["emb", "mask3"], ["context"]),
    ]
    inits = [_const("table", text_table(sig.outputs[0].shape[-1])), _const("last_axis", np.array([2], np.int64))]
    graph = helper.make_graph(nodes, "text", [_value_info(s) for s in sig.inputs], [_value_info(s) for s in sig.outputs], inits)
    return save_graph(graph, path)


def clip_weight(tokens: int, width: int) -> np.ndarray:
    return np.random.default_rng(11).standard_normal((3, tokens * width)).astype(np.float32)


def build_clip_graph(path: Path, sig: EngineSignature) -> list[Path]:
    tokens, width = sig.outputs[0].shape[1], sig.outputs[0].shape[2]
    nodes = [
        helper.make_node("ReduceMean", ["pixel_values"], ["pix"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["pix", "w"], ["flat"]),
        helper.make_node("Reshape", ["flat", "shape"], ["clip_fea"]),
    ]
    inits = [_const("w", clip_weight(tokens, width)), _const("shape", np.array([-1, tokens, width], np.int64))]
    graph = helper.make_graph(nodes, "clip", [_value_info(s) for s in sig.inputs], [_value_info(s) for s in sig.outputs], inits)
    return save_graph(graph, path)


def vae_gains(z_dim: int) -> np.ndarray:
    return np.linspace(0.5, 1.5, z_dim, dtype=np.float32)


def vae_contract(part: str, vae: VAEInfo) -> VAEChunkContract:
    return VAEChunkContract(part, vae.version, vae.z_dim, vae.stride[1], vae.stride[0], ())


def build_vae_graph(path: Path, sig: EngineSignature, contract: VAEChunkContract) -> list[Path]:
    s, c = contract.spatial_stride, contract.chunk_frames
    inits = [
        _const("zero", np.float32(0.0)), _const("i0", np.array([0], np.int64)), _const("i3", np.array([3], np.int64)),
        _const("i4", np.array([4], np.int64)), _const("axis1", np.array([1], np.int64)),
        _const("s", np.array([s], np.int64)), _const("head", np.array([0, 0, 0, -1], np.int64)),
        _const("up", np.array([1, 1, c, 1, s, 1, s], np.int64)), _const("up_axes", np.array([4, 6], np.int64)),
        _const("gains", vae_gains(contract.z_dim).reshape(1, -1, 1, 1, 1)),
        _const("three", np.array([3], np.int64)), _const("s_s", np.array([s, s], np.int64)),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Cast", ["first"], ["first_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["first_f"], ["first_sum"], keepdims=0),
        helper.make_node("Mul", ["first_sum", "zero"], ["nothing"]),
    ]
    if contract.part == "decoder":
        nodes += [
            helper.make_node("Slice", ["latent", "i0", "i3", "axis1"], ["rgb"]),
            helper.make_node("Tanh", ["rgb"], ["rgb_t"]),
            helper.make_node("Unsqueeze", ["rgb_t", "up_axes"], ["rgb7"]),
            helper.make_node("Expand", ["rgb7", "up"], ["big"]),
            helper.make_node("Shape", ["latent"], ["lshape"]),
            helper.make_node("Gather", ["lshape", "i4"], ["w"], axis=0),
            helper.make_node("Mul", ["w", "s"], ["ws"]),
            helper.make_node("Concat", ["head", "ws"], ["vshape"], axis=0),
            helper.make_node("Reshape", ["big", "vshape"], ["video_raw"]),
            helper.make_node("Add", ["video_raw", "nothing"], ["video"]),
        ]
    else:
        nodes += [
            helper.make_node("Shape", ["video"], ["vshape"]),
            helper.make_node("Slice", ["vshape", "i0", "three"], ["bct"]),
            helper.make_node("Gather", ["vshape", "i3"], ["hs"], axis=0),
            helper.make_node("Gather", ["vshape", "i4"], ["wsz"], axis=0),
            helper.make_node("Div", ["hs", "s"], ["h"]),
            helper.make_node("Div", ["wsz", "s"], ["w"]),
            helper.make_node("Concat", ["bct", "h", "s", "w", "s"], ["blocks"], axis=0),
            helper.make_node("Reshape", ["video", "blocks"], ["v7"]),
            helper.make_node("ReduceMean", ["v7"], ["m"], axes=[1, 2, 4, 6], keepdims=0),
            helper.make_node("Unsqueeze", ["m", "up_axes_enc"], ["m5"]),
            helper.make_node("Mul", ["m5", "gains"], ["latent_raw"]),
            helper.make_node("Add", ["latent_raw", "nothing"], ["latent"]),
        ]
        inits.append(_const("up_axes_enc", np.array([1, 2], np.int64)))
    graph = helper.make_graph(nodes, contract.component, [_value_info(t) for t in sig.inputs],
                              [_value_info(t) for t in sig.outputs], inits)  # fmt: skip
    return save_graph(graph, path)


def write_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer.json with the umt5 special tokens (<pad>, </s>, <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def tokenize(text: str) -> list[int]:
    """What the test tokenizer gives for `text` (lower-case words), with </s> appended."""
    return [VOCAB.index(w) if w in VOCAB else VOCAB.index("<unk>") for w in text.split()] + [VOCAB.index("</s>")]


def _component(root: Path, name: str, kind: str, sig: EngineSignature, build, expert=None, **kw) -> Component:
    files = build(root / name / "model.onnx", sig, **kw)
    rels = [str(p.relative_to(root)) for p in files]
    return Component(name=name, kind=kind, onnx=rels[0], signature=sig, precision="fp32", files=rels, expert=expert)


def make_bundle(
    root: Path,
    family: str = "wan2.2",
    task: str = "t2v",
    moe: bool = True,
    sampling: SamplingDefaults | None = None,
    clip_tokens: int | None = None,
    batch_range: tuple[int, int] = (1, 2),
    pad_floats: int = 64,
    vae_version: str = "2.1",
    with_vae: bool = True,
    extra_components: dict[str, Component] | None = None,
) -> Path:
    """A real bundle (manifest + ONNX files + tokenizer) with DiT, text, VAE and (optionally) CLIP engines."""
    root.mkdir(parents=True, exist_ok=True)
    vae = VAEInfo.for_version(vae_version)
    in_dim = vae.z_dim + (4 + vae.z_dim if task in ("i2v", "flf2v", "animate") else 0)
    per_frame = task == "ti2v"
    animate = AnimateConfig(motion_size=FACE_SIZE, motion_channels=(4, 4)) if task == "animate" else None
    if animate is not None:
        clip_tokens = clip_tokens or 257
        sig = animate_dit_signature(in_dim, vae.z_dim, TEXT_DIM, vae.z_dim, FACE_SIZE, clip_tokens=clip_tokens,
                                    clip_dim=CLIP_WIDTH)  # fmt: skip
    else:
        sig = dit_signature(in_dim, vae.z_dim, TEXT_DIM, clip_tokens=clip_tokens, per_frame_timestep=per_frame,
                            clip_dim=CLIP_WIDTH)  # fmt: skip
    ranges = dict(sig.dim_ranges, batch=batch_range)
    sig = dataclasses.replace(sig, dim_ranges=ranges)
    components: dict[str, Component] = {}
    experts = [("dit_high_noise", "high_noise"), ("dit_low_noise", "low_noise")] if moe else [("dit", None)]
    for name, expert in experts:
        components[name] = _component(root, name, "dit", sig, build_dit_graph, expert, dit=name, out_dim=vae.z_dim,
                                      pad_floats=pad_floats)  # fmt: skip
    components["text_encoder"] = _component(root, "text_encoder", "text_encoder", text_encoder_signature(TEXT_DIM), build_text_graph)
    if clip_tokens is not None:
        isig = image_encoder_signature(dim=CLIP_WIDTH, tokens=257)
        components["image_encoder"] = _component(root, "image_encoder", "image_encoder", isig, build_clip_graph)
    if with_vae:
        for part in ("encoder", "decoder"):
            contract = vae_contract(part, vae)
            comp = _component(root, contract.component, contract.component, contract.signature(), build_vae_graph,
                              contract=contract)  # fmt: skip
            comp.attributes = contract.attributes()
            components[contract.component] = comp
    components.update(extra_components or {})
    write_tokenizer(root / "tokenizer")
    dit = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=in_dim, out_dim=vae.z_dim,
                    text_dim=TEXT_DIM, image_branch=clip_tokens is not None, clip_tokens=clip_tokens,
                    clip_dim=CLIP_WIDTH, animate=animate)  # fmt: skip
    if sampling is None:
        sampling = SamplingDefaults(sampler="unipc", steps=6, shift=5.0, guide_scale=(3.0, 4.0),
                                    boundary=0.875 if moe else None, frames=5, height=32, width=48, fps=8,
                                    negative_prompt="bad blurry")  # fmt: skip
    manifest = Manifest(family=family, task=task, dit=dit, vae=vae, components=components, sampling=sampling,
                        tokenizer="tokenizer")  # fmt: skip
    write_manifest(root, manifest)
    return root
