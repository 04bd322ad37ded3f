"""Modes that record what they see, shared by the tests that check a mode sees the ops."""
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class SeenFunctions(TorchFunctionMode):
    """Records str(func) of every call that reaches __torch_function__, then runs it."""

    def __init__(self):
        super().__init__()
        self.funcs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.funcs.append(str(func))
        return func(*args, **(kwargs or {}))


class SeenOps(TorchDispatchMode):
    """Records str(func) of every op that reaches __torch_dispatch__, then runs it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
