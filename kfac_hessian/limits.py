"""Every size limit of the package in one place, with what it bounds and why it has its value.

The limits mean different things — a matrix the user asked for, an exact block kept dense, a working buffer, a choice
between two algorithms — so they have different values; none of them changes a result, only which representation or
path is taken, or when a request is refused with a message that names the alternative.
"""

# Matrices formed for the user (``to_dense`` of blocks and exact operators). 20 000² entries are 1.6 GB in float32:
# the largest matrix a test or a small-model study should ask for; above it, products, ``eig()`` or Lanczos.
DENSE_LIMIT = 20_000

# Exact blocks kept as one dense matrix (normalization layers, per-sample parameter blocks): P ≤ 4096 is 16.8 M
# entries, an eigendecomposition of a few seconds on a CPU. Wider parameters keep per-feature sub-blocks or their
# exact diagonal. The same bound refuses the unit eigenvectors of a diagonal ``A`` as a dense (width, width) matrix.
DENSE_BLOCK_LIMIT = 4096

# Kronecker factors at least this wide keep their rows U while they are fewer than the width (``F = scale · UᵀU``,
# ``blocks.row_factor``): GPT-2's 3072-wide MLP factors and its 50 257-wide head G on a few hundred tokens. Narrower
# factors stay dense whatever their rows: at most 2048² entries (16 MB in float32, an eigendecomposition well under a
# second), and every consumer of the matrices (EKFAC, the fit, the PAC-Bayes bases) gets them as they are.
ROW_FACTOR_MIN_WIDTH = 2048

# Entries (rows × width) of the rows kept for one factor too wide to be formed densely (width² above this): beyond it
# the rows are sketched to ℓ = this / (2·width) rows (Frequent Directions, ``gram.FrequentDirections``, with a certified
# error bound). 2²⁷ entries are 512 MB in float32: GPT-2's 50 257-wide head G keeps up to 2670 rows exactly (mc on
# 2048 tokens is 2048 rows).
ROW_SKETCH_ELEMENTS = 2**27

# Elements of a working buffer materialized at once: per-sample gradients and outputs of per-sample parameter blocks,
# unfolded convolution patches, per-sample gradient matrices of the per-sample pass (EKFAC, the fit).
# 2²⁴ elements are 64 MiB in float32: large enough for full-speed matrix products, small next to the activations.
WORK_BUFFER_ELEMENTS = 2**24

# Columns of one product when an operator is formed densely column by column (exact operators, Lanczos on small
# operators): each column is one tangent through the model, so memory grows with it; 128 keeps a GPT layer in memory.
DENSE_COLUMNS = 128

# Operators of at most this size are decomposed densely by ``lanczos`` (one ``eigh``), which is then cheaper and more
# accurate than a Krylov iteration.
LANCZOS_DENSE_LIMIT = 512

# Blocks of at most this size are measured densely on the exact path by ``compare`` (full exact spectrum, Frobenius
# error); larger ones by Lanczos, SLQ and Hutchinson. A dense exact block costs P products (P/128 passes over the data).
COMPARE_DENSE_LIMIT = 5000

# Eigenvalues histogrammed per chunk by ``density`` (4 M values, 16 MB in float32): a block of 10⁹ eigenvalues
# (products μ_j λ_i) is binned without ever holding them all.
DENSITY_CHUNK = 2**22

# Samples of the first batch on which a layer kind's formula is checked against the recorded output (two samples
# catch a formula that mixes samples; more only cost time: the check re-runs the module's computation).
CHECKED_SAMPLES = 2

# Hutchinson probes per product (each probe is one column of a multi-vector product).
PROBE_CHUNK = 256

# Samples of the first batch the sample-axis probe runs the model on (``factors.sample_axis``): its runs keep every
# recorded tensor, so they cost what a forward of that many samples does, whatever the batch size; three samples
# rotate visibly and leave two when one is left out.
SAMPLE_AXIS_PROBE_SAMPLES = 3

# The longest a curvature pass may take by default, in seconds of the plan's estimate (``factors.plan``: its cost in
# forward+backward passes of the data times one timed forward's): an hour. ``"ggn"`` on full-size GPT-2 needs one
# backward pass per vocabulary entry and a dense 50 257² head ``G``: about 385 000 forward+backward passes of 256
# tokens, days on a CPU; above the limit ``compute_kfac`` refuses and names ``"mc"`` and ``column_signs``. Small models
# never come near it.
PASS_SECONDS_LIMIT = 3600.0
