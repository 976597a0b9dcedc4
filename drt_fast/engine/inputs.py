"""The inputs and keys a SmoothedClassifier is given, checked and put in the engine's form."""
import contextlib
import warnings

import torch

from ..errors import InvalidArgument, InvalidArgumentType, first_line


def check_inputs(xs, keys):
    """Inputs ``[B, *S]`` (floating pixels, finite) and keys ``[B]`` (dataset indices, >= 0)
    -> (xs as a tensor, keys as a list of ints)."""
    if isinstance(xs, (list, tuple)) and xs and all(isinstance(x, torch.Tensor) for x in xs):
        # B inputs [*S] as a list (torch.as_tensor takes only one-element tensors there)
        try:
            xs = torch.stack(list(xs))
        except RuntimeError as err:
            raise InvalidArgument(f"inputs given as a list of tensors must have one shape "
                                  f"and device: {first_line(err)}") from None
    xs = torch.as_tensor(xs)
    if xs.numel() == 0 and xs.dim() < 2:
        xs = xs.reshape(0, 0).float()           # no inputs (e.g. a plain []): no work
    if not xs.is_floating_point():
        raise InvalidArgument(f"inputs must be floating-point pixels, got dtype {xs.dtype}")
    if xs.dim() < 2:
        raise InvalidArgument(f"inputs must have shape [B, *S], got {list(xs.shape)}")
    finite = torch.isfinite(xs).flatten(1).all(1)
    if not bool(finite.all()):
        # checked here: a rewritten member need not carry a NaN through (oneDNN's ReLU turns
        # it into 0), so NaN logits would not reliably report it
        raise InvalidArgument(f"input {int((~finite).nonzero()[0])} of {xs.shape[0]} has NaN "
                              f"or infinite pixels")
    try:
        keys = torch.as_tensor(keys).cpu().reshape(-1)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:   # None, "3", 2**64
        raise InvalidArgumentType(f"keys must be integer dataset indices in [0, 2^63), got "
                                  f"{keys!r} ({first_line(err)})") from None
    if keys.numel() == 0 == xs.shape[0]:
        keys = keys.to(torch.int64)             # torch.as_tensor([]) is float32
    if keys.is_floating_point() or keys.dtype == torch.bool or keys.numel() != xs.shape[0]:
        raise InvalidArgument(
            f"expected {xs.shape[0]} integer keys (one dataset index per input), got "
            f"{keys.numel()} of dtype {keys.dtype}")
    keys = keys.to(torch.int64).tolist()
    if keys and min(keys) < 0:       # (int64 holds no key of 2^63 or more)
        raise InvalidArgument(f"keys (dataset indices) must be >= 0, got {min(keys)}")
    if len(set(keys)) != len(keys):
        seen = set()
        repeated = next(k for k in keys if k in seen or seen.add(k))
        # inputs with one key would get the same noise: their errors would be one event
        raise InvalidArgument(f"keys must be distinct, one dataset index per input (each "
                              f"input's noise is drawn from its key); key {repeated} repeats")
    return xs, keys


def warn_outside_pixel_range(xs) -> bool:
    """Noise is added in the data's pixel space, [0, 1] for images (normalization lives in the
    model): warn when inputs xs are outside it, as normalized images would be -> whether it did."""
    if xs.numel() == 0:
        return False
    low, high = (float(v) for v in torch.aminmax(xs))
    if 0.0 <= low and high <= 1.0:
        return False
    warnings.warn(f"drt_fast: inputs hold values in [{low:.4g}, {high:.4g}], outside [0, 1]: noise "
                  f"is added to the inputs as given, so sigma is in their units; for images pass "
                  f"pixels in [0, 1] and put the normalization in the model "
                  f"(drt_fast.models.NormalizeLayer)", RuntimeWarning, stacklevel=4)
    return True


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode while sampling, as in Cohen's core.py (dropout and batch
    statistics would make the base classifier random); each module's mode is restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
