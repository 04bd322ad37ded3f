"""A parameter comparison shared by the tests that train the same run two ways (1 vs N processes, fused
vs default Adam): equal to rounding, except the attention key biases."""
import torch


def assert_param_close(name: str, a: torch.Tensor, b: torch.Tensor, key_bias_bound: float) -> None:
    """``a`` and ``b`` (the parameter ``name`` of the two runs) agree to rtol 1e-4 / atol 2e-5 in float64,
    except the key biases (``self_attn.in_proj_bias[D:2D]``): their exact gradient is 0 (softmax ignores a
    shift), so their float32 gradient is rounding noise, which Adam normalizes into steps of up to ~lr —
    they must agree within ``key_bias_bound`` (steps · lr)."""
    x, y = a.double(), b.double()
    if name.endswith("self_attn.in_proj_bias"):
        D = x.numel() // 3
        assert (x[D:2 * D] - y[D:2 * D]).abs().max() <= key_bias_bound, name
        x, y = torch.cat([x[:D], x[2 * D:]]), torch.cat([y[:D], y[2 * D:]])
    torch.testing.assert_close(x, y, rtol=1e-4, atol=2e-5, msg=lambda m: "%s: %s" % (name, m))
