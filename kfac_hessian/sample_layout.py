"""Where the samples of a batch are in one recorded tensor (an input or output leaf of a module call), as found by the
sample-axis probe (``factors/sample_axis.py``), and the reshapes that put them first.

A layout is one of

* ``axis`` — axis ``axis`` holds the ``N`` samples (``(N, T, d)``, sequence-first ``(T, N, d)``, …);
* ``rows`` — axis ``axis`` holds the samples' rows flattened, ``N·R`` entries: sample-major (entry ``n·R + r``,
  ``(N·T, d)`` as in OPT's MLP or Swin's windows) or position-major (entry ``r·N + n``);
* ``whole`` — a batch of one sample: the whole tensor is that sample;
* ``shared`` — the same for every sample and without a sample axis (T5's relative-attention bias): no per-sample
  quantity is observable at it;
* ``constant`` — the same for every sample, though its shape could carry them (zeros of a dead ReLU or of LoRA's
  zero-initialized B, identical samples, a mask of ones), and its shape did not tell either;
* ``unknown`` — it changes with the samples, but along no axis the probe recognizes (dropout in train mode, batch
  statistics, samples mixed), or along several; ``reason`` says which.

``samples`` is the batch size the layout is bound to (``bound``): a ``rows`` layout splits its axis by it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor


@dataclass(frozen=True)
class SampleLayout:
    """Where the samples are in one tensor (module docstring)."""

    state: str
    axis: int = 0
    sample_major: bool = True
    samples: int = 0
    reason: str = ""

    @property
    def carries_samples(self) -> bool:
        """Whether the tensor holds the samples along a known axis (or is the one sample)."""
        return self.state in ("axis", "rows", "whole")

    def bound(self, samples: int) -> SampleLayout:
        """This layout for a batch of ``samples`` samples (a batch of one: ``whole``)."""
        return WHOLE if samples == 1 and self.carries_samples else replace(self, samples=samples)

    def fits(self, tensor: Tensor, lead: int = 0) -> bool:
        """Whether ``tensor`` (after ``lead`` leading axes) has the axis this layout describes, of a matching size."""
        if self.state == "whole":
            return True
        if self.state not in ("axis", "rows") or tensor.dim() <= lead + self.axis:
            return False
        size = tensor.shape[lead + self.axis]
        return size == self.samples if self.state == "axis" else size % self.samples == 0

    def samples_first(self, tensor: Tensor, lead: int = 0) -> Tensor:
        """``tensor`` with the samples on axis ``lead``: ``(*lead axes, N, *one sample)``; one sample of an ``axis``
        layout lacks that axis, one of a ``rows`` layout keeps its ``R`` rows where the axis was."""
        at = lead + self.axis
        if self.state == "whole":
            return tensor.unsqueeze(lead)
        if self.state == "axis":
            return tensor.movedim(at, lead)
        if self.state == "rows":
            n = self.samples
            if self.sample_major:
                return tensor.unflatten(at, (n, -1)).movedim(at, lead)
            return tensor.unflatten(at, (-1, n)).movedim(at + 1, lead)
        raise ValueError(f"a tensor laid out as {self.state!r} has no sample axis")

    def as_batch_of_one(self, sample: Tensor) -> Tensor:
        """One sample (a slice of ``samples_first``) as the module would see it in a batch of one."""
        return sample.unsqueeze(self.axis) if self.state == "axis" else sample

    def from_batch_of_one(self, tensor: Tensor) -> Tensor:
        """The inverse of ``as_batch_of_one``: a module's output for a batch of one as that sample's slice."""
        return tensor.squeeze(self.axis) if self.state == "axis" else tensor

    def first(self, tensor: Tensor, count: int) -> Tensor:
        """The first ``count`` samples of ``tensor``, laid out as before."""
        if self.state == "axis":
            return tensor.narrow(self.axis, 0, count)
        if self.state == "rows":
            rows = tensor.shape[self.axis] // self.samples
            if self.sample_major:
                return tensor.narrow(self.axis, 0, count * rows)
            return tensor.unflatten(self.axis, (rows, self.samples)).narrow(self.axis + 1, 0, count).flatten(
                self.axis, self.axis + 1)
        return tensor

    def describe(self) -> str:
        if self.state == "axis":
            return f"samples on axis {self.axis}"
        if self.state == "rows":
            order = "sample-major" if self.sample_major else "position-major"
            return f"samples' rows flattened on axis {self.axis} ({order})"
        if self.state == "shared":
            return f"shared by all samples (no sample axis{': ' + self.reason if self.reason else ''})"
        return {"whole": "one sample", "constant": "the same for every sample (the probe cannot tell its sample axis)"
                }.get(self.state, f"no sample axis found ({self.reason})")


WHOLE = SampleLayout("whole")
SHARED = SampleLayout("shared")
CONSTANT = SampleLayout("constant")
LEADING = SampleLayout("axis", 0)


def unknown(reason: str) -> SampleLayout:
    return SampleLayout("unknown", reason=reason)


def rows_layout(inputs: SampleLayout, outputs: list[SampleLayout]) -> SampleLayout:
    """The sample layout shared by a layer's input and output rows (every kind keeps its location axes: a linear
    layer's leading axes, a convolution's axis 0, a normalization's whole shape): its first input's where the probe
    found it there, else its first output's (the input of a layer after a dead ReLU carries no information), else the
    most telling of the two."""
    for layout in (inputs, *outputs[:1]):
        if layout.carries_samples:
            return layout
    for layout in (inputs, *outputs[:1]):
        if layout.state in ("shared", "unknown"):
            return layout
    return inputs
