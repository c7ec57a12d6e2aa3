"""Optimization profiles from the sizes a user will run: `--sizes`, `--frames`, `--batch`, `--static`.

Pure Python (no TensorRT, no torch).  The user speaks in video pixels and frames; each component's
engine takes latent units (DiT, VAE), prompts (text encoder) or images (CLIP), so a request goes
through the family's latent rules (`runtime.sizes`: frames 4k+1, sizes multiples of VAE stride x
patch, latent = (F-1)/4+1 frames x H/s x W/s) into (min, opt, max) of every named dim of an engine
signature, and from there into the shape of every dynamic input (`profile_shapes`):

    dit            batch       --batch (opt: its max when the bundle samples with CFG, which the
                               runtime runs as one batch-2 call; else its min)
                   frames      latent frames of --frames      height / width: latent rows/columns
                               (VACE: max + VACE_REFERENCE_FRAMES, the latent frames `run --ref-image`
                               puts in front; a --static VACE plan takes no reference images)
    text_encoder   batch       as the DiT (prompt + negative prompt)
                   tokens      1 .. text_len (512), opt text_len: the runtime feeds each prompt's
                               own length, at most 512
    image_encoder  batch       1, or 2 for flf2v (first and last frame)
    vae_*          height / width   the signature's least (2: the edge tiles of `run --vae-tiling`)
                               .. the largest latent size; opt: the first size; `height_xS` dims are
                               S times those

One profile spans every requested size: min and max are taken dim by dim over the sizes (480p is
480x832 and 832x480: latent 60..104 on both axes), opt is the first.  `--static WxHxF` makes every
dim but the text length exact (and the VAE's least size the frame's, so such a VAE plan does not
take `--vae-tiling` tiles).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from wanrt.engines.errors import WanrtError
from wanrt.engines.plans import ProfileShapes
from wanrt.engines.signatures import EngineSignature
from wanrt.runtime.sizes import VideoGeometry, check_frames, size_multiple

# Named sizes (height, width), landscape first (the opt shape); both orientations are built.  On a VAE with a
# 32-pixel multiple (Wan2.2's 16x VAE) a size is floored to it: 720p becomes 704x1280, the official TI2V-5B size.
SIZE_PRESETS: dict[str, tuple[int, int]] = {"480p": (480, 832), "720p": (720, 1280)}
SIZES_FORM = "480p, 720p or WIDTHxHEIGHT, comma-separated"

DimRange = tuple[int, int, int]  # (min, opt, max)
VACE_REFERENCE_FRAMES = 3  # reference images a VACE DiT plan has room for (one latent frame each)


class ProfileError(WanrtError):
    """A requested size, frame count or batch that the model or its engines cannot take."""


@dataclass(frozen=True)
class ShapeRequest:
    """What the user will run: pixel sizes (height, width) and video frame counts, the first of each is opt."""

    sizes: tuple[tuple[int, int], ...]
    frames: tuple[int, ...]
    batch: tuple[int, int] = (1, 2)  # (min, max) batch of the DiT and text encoder
    static: bool = False  # every dim exact (the first size and frame count)

    def geometries(self, stride: tuple[int, int, int]) -> list[VideoGeometry]:
        """Every (size, frames) pair as a video geometry; the opt pair first."""
        return [VideoGeometry(f, h, w, stride) for f in self.frames for h, w in self.sizes]


def _positive_int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ProfileError(f"{what}: {text!r} is not a whole number") from None
    if value < 1:
        raise ProfileError(f"{what}: {value} must be at least 1")
    return value


def parse_size(text: str, multiple: int, what: str = "--sizes") -> tuple[int, int]:
    """"832x480" (width x height) -> (480, 832), checked to be a multiple of the family's `multiple`."""
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise ProfileError(f"{what} {text!r}: expected {SIZES_FORM}")
    width, height = (_positive_int(p, f"{what} {text!r}") for p in parts)
    if width % multiple or height % multiple:
        fit = f"{max(multiple, width // multiple * multiple)}x{max(multiple, height // multiple * multiple)}"
        raise ProfileError(f"{what} {text}: width and height must be multiples of {multiple} for this model (e.g. {fit})")
    return height, width


def parse_sizes(text: str, multiple: int) -> tuple[tuple[int, int], ...]:
    """`--sizes 480p,720p,1024x1024` -> (height, width) pairs in order, presets in both orientations, no repeats."""
    sizes: list[tuple[int, int]] = []
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        preset = SIZE_PRESETS.get(token.lower())
        if preset is not None:
            h, w = (d // multiple * multiple for d in preset)
            sizes += [(h, w), (w, h)]
        else:
            sizes.append(parse_size(token, multiple))
    if not sizes:
        raise ProfileError(f"--sizes {text!r}: no size given; expected {SIZES_FORM}")
    return tuple(dict.fromkeys(sizes))


def parse_frames(text: str, temporal_stride: int = 4) -> tuple[int, ...]:
    """`--frames 81` or `17,81`: video frame counts (each 4k+1), the first is opt."""
    frames = [check_frames(_positive_int(t.strip(), "--frames"), temporal_stride) for t in text.split(",") if t.strip()]
    if not frames:
        raise ProfileError(f"--frames {text!r}: no frame count given")
    return tuple(dict.fromkeys(frames))


def parse_batch(text: str) -> tuple[int, int]:
    """`--batch 1-2` (or `1`): the (min, max) batch."""
    lo_text, _, hi_text = text.partition("-")
    lo = _positive_int(lo_text.strip(), "--batch")
    hi = _positive_int(hi_text.strip(), "--batch") if hi_text else lo
    if hi < lo:
        raise ProfileError(f"--batch {text!r}: the largest batch is below the smallest")
    return lo, hi


def parse_static(text: str, multiple: int, temporal_stride: int = 4) -> tuple[tuple[int, int], int]:
    """`--static 832x480x81` (width x height x frames) -> ((height, width), frames)."""
    parts = text.lower().split("x")
    if len(parts) != 3:
        raise ProfileError(f"--static {text!r}: expected WIDTHxHEIGHTxFRAMES, e.g. 832x480x81")
    size = parse_size("x".join(parts[:2]), multiple, "--static")
    return size, check_frames(_positive_int(parts[2], f"--static {text!r}"), temporal_stride)


def shape_request(stride: tuple[int, int, int], sizes: str | None, frames: str | None, batch: str, static: str | None,
                  default_size: tuple[int, int], default_frames: int) -> ShapeRequest:  # fmt: skip
    """The request from the build-engine options; without `--sizes`, the preset holding the model's default size."""
    multiple = size_multiple(stride)
    lo, hi = parse_batch(batch)
    if static is not None:
        if sizes is not None or frames is not None:
            raise ProfileError("--static gives the one size and frame count to build: drop --sizes/--frames")
        size, count = parse_static(static, multiple, stride[0])
        return ShapeRequest((size,), (count,), (lo, hi), static=True)
    if sizes is None:
        floored = {name: {d // multiple * multiple for d in hw} for name, hw in SIZE_PRESETS.items()}
        preset = next((name for name, hw in floored.items() if hw == set(default_size)), None)
        sizes = preset or f"{default_size[1]}x{default_size[0]}"
    frame_counts = parse_frames(frames, stride[0]) if frames is not None else (check_frames(default_frames, stride[0]),)
    return ShapeRequest(parse_sizes(sizes, multiple), frame_counts, (lo, hi))


def _span(values: Iterable[int]) -> DimRange:
    """(min, opt, max) of values, opt being the first."""
    values = list(values)
    return min(values), values[0], max(values)


def latent_dims(request: ShapeRequest, stride: tuple[int, int, int]) -> dict[str, DimRange]:
    """(min, opt, max) latent frames, height and width over the request's sizes and frame counts."""
    geos = request.geometries(stride)
    if request.static:
        geos = geos[:1]
    return {
        "frames": _span(g.latent_frames for g in geos),
        "height": _span(g.latent_height for g in geos),
        "width": _span(g.latent_width for g in geos),
    }


def batch_span(request: ShapeRequest, cfg: bool) -> DimRange:
    """The DiT / text-encoder batch: opt is the largest when the bundle samples with CFG (one batch-2 call)."""
    lo, hi = request.batch
    opt = hi if cfg else lo
    return (opt, opt, opt) if request.static else (lo, opt, hi)


def named_dims(kind: str, request: ShapeRequest, stride: tuple[int, int, int], signature: EngineSignature, *,
               cfg: bool, task: str, text_len: int = 512) -> dict[str, DimRange]:  # fmt: skip
    """(min, opt, max) of every named dim a component of `kind` may have (see the module docstring)."""
    latent = latent_dims(request, stride)
    if kind == "dit":
        if task == "vace" and not request.static:
            lo, opt, hi = latent["frames"]
            latent["frames"] = (lo, opt, hi + VACE_REFERENCE_FRAMES)
        return {"batch": batch_span(request, cfg), **latent}
    if kind == "text_encoder":
        return {"batch": batch_span(request, cfg), "tokens": (1, text_len, text_len)}
    if kind == "image_encoder":
        images = 2 if task == "flf2v" else 1
        return {"batch": (images, images, images) if request.static else (1, images, images)}
    if kind in ("vae_encoder", "vae_decoder"):
        dims = {}
        for axis in ("height", "width"):
            lo, opt, hi = latent[axis]
            least = signature.dim_ranges.get(axis, (lo, hi))[0]
            dims[axis] = (lo, opt, hi) if request.static else (min(least, lo), opt, hi)
        return dims
    raise ProfileError(f"no optimization-profile rule for component kind {kind!r}")


def _dim_value(name: str, dims: Mapping[str, DimRange]) -> DimRange | None:
    """A signature dim's (min, opt, max): itself, or S times its axis for `axis_xS`."""
    if name in dims:
        return dims[name]
    axis, sep, scale = name.rpartition("_x")
    if sep and scale.isdigit() and axis in dims:
        return tuple(int(scale) * v for v in dims[axis])  # type: ignore[return-value]
    return None


def _out_of_range(component: str, dim: str, span: DimRange, allowed: tuple[int, int], stride: tuple[int, int, int]) -> str:
    """The one-line reason a profile dim exceeds its signature range, in the user's units."""
    lo, hi = allowed
    bad = span[2] if span[2] > hi else span[0]
    if dim == "frames":
        return (f"{component}: {(bad - 1) * stride[0] + 1} frames ({bad} latent frames) are outside the "
                f"{(lo - 1) * stride[0] + 1}..{(hi - 1) * stride[0] + 1} its graph takes; ask for fewer --frames")  # fmt: skip
    if dim in ("height", "width"):
        px = stride[1] if dim == "height" else stride[2]
        return (f"{component}: {dim} {bad * px} px (latent {bad}) is outside the {lo * px}..{hi * px} px "
                f"(latent {lo}..{hi}) its graph takes; ask for smaller --sizes")  # fmt: skip
    return f"{component}: {dim} {bad} is outside the {lo}..{hi} its graph takes"


def profile_shapes(component: str, signature: EngineSignature, dims: Mapping[str, DimRange],
                   stride: tuple[int, int, int] = (4, 8, 8)) -> ProfileShapes:  # fmt: skip
    """The (min, opt, max) shape of every dynamic input of `signature`; ProfileError when a dim exceeds its range."""
    shapes = {}
    for spec in signature.inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue  # a static input needs no profile entry
        lo_opt_hi: list[list[int]] = [[], [], []]
        for d in spec.shape:
            span = (d, d, d) if isinstance(d, int) else _dim_value(d, dims)
            if span is None:
                raise ProfileError(f"{component}: input {spec.name} has a dim {d!r} no profile rule sizes")
            if isinstance(d, str) and d in signature.dim_ranges:
                allowed = signature.dim_ranges[d]
                if span[0] < allowed[0] or span[2] > allowed[1]:
                    base = d.rpartition("_x")[0] if "_x" in d else d
                    scale = int(d.rpartition("_x")[2]) if "_x" in d else 1
                    raise ProfileError(_out_of_range(component, base, tuple(v // scale for v in span),
                                                     tuple(v // scale for v in allowed), stride))  # fmt: skip
            for i in range(3):
                lo_opt_hi[i].append(span[i])
        shapes[spec.name] = tuple(tuple(x) for x in lo_opt_hi)
    return ProfileShapes(shapes)  # type: ignore[arg-type]
