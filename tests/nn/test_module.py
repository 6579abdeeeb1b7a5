"""Parameter/Module bookkeeping: naming, tying, state dicts, recording."""

import numpy as np
import pytest

from npformer.nn.module import Module, ModuleList, Parameter


class Scale(Module):
    def __init__(self, n):
        super().__init__()
        self.w = Parameter(np.arange(n, dtype=np.float64))

    def forward(self, x):
        self.x = x
        y = x * self.w.data
        self.record("y", y)
        return y

    def backward(self, dy):
        self.w.grad += (dy * self.x).sum(0)
        self.record("dw", self.w.grad)
        return dy * self.w.data


class Net(Module):
    def __init__(self):
        super().__init__()
        self.layers = ModuleList([Scale(3), Scale(3)])
        self.tied = self.layers[0]  # the same module reached twice


def test_named_parameters_are_paths_and_tied_appear_once():
    net = Net()
    assert [n for n, _ in net.named_parameters()] == ["layers.0.w", "layers.1.w"]
    assert net.num_parameters() == 6


def test_state_dict_round_trip_and_errors():
    a, b = Net(), Net()
    a.layers[1].w.data += 5
    b.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(b.layers[1].w.data, [5.0, 6.0, 7.0])
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.w'\]"):
        b.load_state_dict({"layers.0.w": np.zeros(3)})
    with pytest.raises(ValueError, match=r"entry 'layers.0.w' expected shape \(3,\), got \(4,\)"):
        b.load_state_dict({"layers.0.w": np.zeros(4), "layers.1.w": np.zeros(3)})


def test_grads_accumulate_until_zero_grad():
    net = Net()
    x = np.ones((2, 3))
    for _ in range(2):
        net.layers[0].forward(x)
        net.layers[0].backward(np.ones((2, 3)))
    np.testing.assert_array_equal(net.layers[0].w.grad, [4.0, 4.0, 4.0])
    net.zero_grad()
    np.testing.assert_array_equal(net.layers[0].w.grad, [0.0, 0.0, 0.0])


def test_recording_names_values_by_path_in_order():
    net = Net()
    rec = net.start_recording()
    y = net.layers[1].forward(net.layers[0].forward(np.ones((1, 3))))
    net.layers[0].backward(net.layers[1].backward(np.ones_like(y)))
    assert list(rec) == ["layers.0.y", "layers.1.y", "layers.1.dw", "layers.0.dw"]
    np.testing.assert_array_equal(rec["layers.1.y"], [[0.0, 1.0, 4.0]])
    net.stop_recording()
    net.layers[0].forward(np.ones((1, 3)))
    assert len(rec) == 4


def test_train_eval_and_astype():
    net = Net().eval()
    assert not any(m.training for _, m in net.named_modules())
    net.train().astype(np.float32)
    assert all(m.training for _, m in net.named_modules())
    assert {p.data.dtype for p in net.parameters()} == {np.dtype(np.float32)}
    assert {p.grad.dtype for p in net.parameters()} == {np.dtype(np.float32)}


def test_parameter_rejects_non_float():
    with pytest.raises(ValueError, match="Parameter: argument 'data'"):
        Parameter(np.arange(3))
