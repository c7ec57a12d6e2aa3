"""The Triton source of our attention kernel (forward, no mask): flash attention, optionally with
SageAttention-style quantized QK^T.

    out[b, h] = softmax(scale * q[b, h] @ k[b, h]^T) @ v[b, h]      q [Sq, D], k, v [Sk, D]

One program computes BLOCK_M query rows of one (batch, head): it keeps its Q tile, streams K and V
in BLOCK_N-row tiles and keeps the softmax online in float32, in base 2 (the host passes
scale * log2(e), so each score costs one FMA and one exp2).  Full K/V tiles are read without masks;
only the partial tile at the end of K is masked (and handled first).  Program grid: (cdiv(Sq, BLOCK_M), B * heads).

QK_FORMAT selects the precision of QK^T:
  0  the input dtype (bf16 / fp16; fp32 inputs use tf32), float32 accumulation;
  1  fp8 e4m3 (SageAttention's idea): K is smoothed by subtracting a per-head mean over tokens
     (softmax-invariant: q.(k - mu) differs from q.k by q.mu, the same for every key of a query
     row), Q is quantized with one scale per query row (a block of one token; free, since the
     scale multiplies a whole score row) and each K tile with one scale per BLOCK_N-token block;
     the dot accumulates in float32;
  2  int8 (SageAttention v1's format), same smoothing and scales, int32 accumulation.
P @ V always runs in the input dtype with float32 accumulation (fp8 P and V would add about
4e-2 relative error on their own; see bench/RESULTS.md).

mu is the mean of K over all tokens when Sk <= MEAN_ROWS, else over MEAN_ROWS tokens spread evenly
over the sequence (any vector subtracted from every key leaves the softmax unchanged, so an
estimate only affects how well the bias is removed, never the result's definition; every program
of a head uses the same rows, so the result does not depend on the tiling).

The launch ABI is TensorRT's for ahead-of-time Python plugins: input pointers, then int32 scalars,
then output pointers.  The softmax scale arrives as the bit pattern of the float32
scale * log2(e) (QDP passes only integer scalars).  The kernel uses no Triton scratch memory and no
tensor descriptors, so TensorRT can launch it with only those arguments.

INTERPRETED is set when this source runs in Triton's CPU interpreter: there, bf16 dots are
computed on float32 copies (the interpreter multiplies raw bf16 storage) and values are rounded to
the e4m3 grid in float32 before the cast (the interpreter's float-to-fp8 conversion drops the
mantissa carry); both change how the CPU emulates the kernel, not what the GPU runs.

This module is loaded twice by `plugins_trt.kernels` (compiled and interpreted); import that one.
"""

import triton
import triton.language as tl

QK_INPUT_DTYPE = 0
QK_FP8_E4M3 = 1
QK_INT8 = 2


@triton.jit
def _round_to_e4m3(x):
    """x (float32, |x| <= 448) rounded to the nearest fp8 e4m3 value, ties to even."""
    ax = tl.abs(x)
    exponent = ((ax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)  # below 2^-6 e4m3 is subnormal, spaced like that binade
    ulp = ((exponent + (127 - 3)) << 23).to(tl.float32, bitcast=True)
    rounded = ((ax / ulp + 8388608.0) - 8388608.0) * ulp  # float32 adds round to nearest even
    return tl.where(x < 0, -rounded, rounded)


@triton.jit
def _quantize(x, QK_FORMAT: tl.constexpr, INTERPRETED: tl.constexpr):
    """x (float32, already scaled into the format's range) in the QK format."""
    if QK_FORMAT == 1:
        x = tl.minimum(tl.maximum(x, -448.0), 448.0)
        if INTERPRETED:
            x = _round_to_e4m3(x)
        return x.to(tl.float8e4nv)
    else:
        x = tl.where(x >= 0, x + 0.5, x - 0.5)  # round half away from zero, then truncate
        return x.to(tl.int8)


@triton.jit
def _dot(a, b, acc, INTERPRETED: tl.constexpr):
    """acc + a @ b with float32 accumulation (bf16 through float32 in the interpreter)."""
    if INTERPRETED:
        if a.dtype == tl.bfloat16:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def _key_mean(k_base, seq_k, offs_n, offs_d, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
              MEAN_ROWS: tl.constexpr):
    """Mean of K over min(Sk, MEAN_ROWS) tokens: all of them, or MEAN_ROWS spread evenly."""
    count = tl.minimum(seq_k, MEAN_ROWS)
    total = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for chunk in range(0, MEAN_ROWS, BLOCK_N):
        i = chunk + offs_n
        rows = tl.where(seq_k <= MEAN_ROWS, i, (i * seq_k) // MEAN_ROWS)
        k = tl.load(k_base + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=(i < count)[:, None], other=0.0)
        total += tl.sum(k.to(tl.float32), 0)
    return total / count.to(tl.float32)


@triton.jit
def _attend_tile(acc, l_i, m_i, q, row_scale, k_ptrs, v_ptrs, start_n, seq_k, k_mean, offs_n,
                 QK_FORMAT: tl.constexpr, MASK_N: tl.constexpr, INTERPRETED: tl.constexpr):
    """One K/V tile of the online softmax: returns the updated (acc, l_i, m_i)."""
    if MASK_N:
        valid = (start_n + offs_n) < seq_k
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    if QK_FORMAT == 0:
        qk = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32), INTERPRETED)
        scores_scale = row_scale
    else:
        kf = k.to(tl.float32) - k_mean[None, :]
        if MASK_N:
            kf = tl.where(valid[:, None], kf, 0.0)
        k_amax = tl.maximum(tl.max(tl.max(tl.abs(kf), 1), 0), 1e-30)
        if QK_FORMAT == 1:
            k_q = _quantize(kf * (448.0 / k_amax), QK_FORMAT, INTERPRETED)
            qk = tl.dot(q, tl.trans(k_q), tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32))
            scores_scale = row_scale * (k_amax / 448.0)
        else:
            k_q = _quantize(kf * (127.0 / k_amax), QK_FORMAT, INTERPRETED)
            qk = tl.dot(q, tl.trans(k_q), tl.zeros([q.shape[0], k.shape[0]], dtype=tl.int32), out_dtype=tl.int32)
            qk = qk.to(tl.float32)
            scores_scale = row_scale * (k_amax / 127.0)
    if MASK_N:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    # scores (base 2) = qk * scores_scale; scores_scale > 0, so the row max commutes with it
    m_new = tl.maximum(m_i, tl.max(qk, 1) * scores_scale)
    p = tl.math.exp2(qk * scores_scale[:, None] - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], INTERPRETED)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["qk_scale_bits", "seq_q", "seq_k"])
def wan_attention_fwd(Q, K, V, qk_scale_bits, seq_q, seq_k, Out,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      QK_FORMAT: tl.constexpr, MEAN_ROWS: tl.constexpr, INTERPRETED: tl.constexpr):
    """Out[b, h] = softmax(scale * Q[b, h] @ K[b, h]^T) @ V[b, h]; contiguous [B, heads, S, HEAD_DIM]."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    qk_scale = qk_scale_bits.to(tl.float32, bitcast=True)  # scale * log2(e)
    q_base = Q + bh * seq_q * HEAD_DIM
    k_base = K + bh * seq_k * HEAD_DIM
    v_base = V + bh * seq_k * HEAD_DIM
    o_base = Out + bh * seq_q * HEAD_DIM

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_rows = offs_m[:, None] < seq_q
    q = tl.load(q_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=q_rows, other=0.0)

    if QK_FORMAT == 0:
        row_scale = tl.full([BLOCK_M], 1.0, dtype=tl.float32) * qk_scale
        k_mean = tl.zeros([HEAD_DIM], dtype=tl.float32)
    else:
        qf = q.to(tl.float32)
        q_amax = tl.maximum(tl.max(tl.abs(qf), 1), 1e-30)
        if QK_FORMAT == 1:
            q = _quantize(qf * (448.0 / q_amax)[:, None], QK_FORMAT, INTERPRETED)
            row_scale = q_amax * (qk_scale / 448.0)
        else:
            q = _quantize(qf * (127.0 / q_amax)[:, None], QK_FORMAT, INTERPRETED)
            row_scale = q_amax * (qk_scale / 127.0)
        k_mean = _key_mean(k_base, seq_k, offs_n, offs_d, HEAD_DIM, BLOCK_N, MEAN_ROWS)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    k_ptrs = k_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    n_full = (seq_k // BLOCK_N) * BLOCK_N
    if n_full < seq_k:  # the partial tile first: peeled before the loop it costs fewer registers than after
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, row_scale, k_ptrs + n_full * HEAD_DIM, v_ptrs + n_full * HEAD_DIM,
                                     n_full, seq_k, k_mean, offs_n, QK_FORMAT, True, INTERPRETED)
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, row_scale, k_ptrs, v_ptrs, start_n, seq_k, k_mean,
                                     offs_n, QK_FORMAT, False, INTERPRETED)
        k_ptrs += BLOCK_N * HEAD_DIM
        v_ptrs += BLOCK_N * HEAD_DIM
    acc = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=q_rows)
