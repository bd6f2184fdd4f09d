"""oneDNN Linear layers (modelkit.runtime.onednn): same maths as F.linear, same parameters, training untouched.

References are ``F.linear`` (an independent kernel: MKL on the CPU) and float64 matmuls; speed is
measured by ``benchmarks/peers.py``, not here.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cfg
from torch import nn

from modelkit import build_model
from modelkit.errors import SpeedOptionError
from modelkit.generation import generate
from modelkit.runtime.onednn import OneDNNLinear, onednn_linear_available, use_onednn_linear_
from modelkit.runtime.stacking import StackedLinear, StackedLinears
from modelkit.runtime.optimize import inductor_cpu_problem, optimize_for_inference

pytestmark = [pytest.mark.speed,
              pytest.mark.skipif(not onednn_linear_available(), reason="this PyTorch build has no oneDNN linear op")]

CFG = tiny_cfg(vocab_size=97, emb_dim=32, context_length=32, qkv_bias=True)


def model(**overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(dict(CFG, **overrides)).eval()


def uses_onednn(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count calls of the oneDNN op (so a test can tell which kernel ran)."""
    calls = [0]
    op = torch.ops.mkldnn._linear_pointwise

    class Counting:
        def __call__(self, *args: object) -> torch.Tensor:
            calls[0] += 1
            return op(*args)

    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", Counting())
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (3, 5, 48), (2, 1, 48), (48,), (0, 48), (2, 3, 2, 48)])
def test_onednn_linear_matches_a_float64_matmul(shape, bias, monkeypatch):
    calls = uses_onednn(monkeypatch)
    torch.manual_seed(2)
    layer = OneDNNLinear.from_linear(nn.Linear(48, 40, bias=bias))
    x = torch.randn(*shape)
    ref = x.double() @ layer.weight.double().T + (layer.bias.double() if bias else 0.0)
    with torch.inference_mode():
        out = layer(x)
    assert calls[0] == 1 and out.shape == (*shape[:-1], 40) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_onednn_linear_takes_strided_inputs_and_column_major_weights():
    torch.manual_seed(3)
    layer = OneDNNLinear.from_linear(nn.Linear(32, 24))
    layer.weight.data = layer.weight.data.t().contiguous().t()
    x = torch.randn(2, 7, 32)[:, -1:, :]  # a non-contiguous slice, as last_only makes
    with torch.no_grad():
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16)])
def test_onednn_linear_trains_with_float64_gradients(shape, monkeypatch):
    calls = uses_onednn(monkeypatch)
    torch.manual_seed(4)
    fast = OneDNNLinear.from_linear(nn.Linear(16, 8))
    ref = nn.Linear(16, 8).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(*shape)
    x64 = x.double().requires_grad_()
    x.requires_grad_()
    fast(x).square().sum().backward()
    ref(x64).square().sum().backward()
    assert calls[0] == 3  # forward, grad of x, grad of the weight
    for got, want in ((x.grad, x64.grad), (fast.weight.grad, ref.weight.grad), (fast.bias.grad, ref.bias.grad)):
        assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)


def test_onednn_linear_leaves_other_dtypes_and_autocast_to_f_linear(monkeypatch):
    calls = uses_onednn(monkeypatch)
    layer = OneDNNLinear.from_linear(nn.Linear(16, 8))
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 16)).dtype == torch.bfloat16  # autocast's F.linear
    with torch.inference_mode():
        layer.double()(torch.randn(2, 16, dtype=torch.float64))  # float64 is not a oneDNN dtype
    assert calls[0] == 0


def test_replacing_linears_keeps_parameters_names_and_ties():
    m = model(tie_embeddings=True)
    before = dict(m.named_parameters())
    keys = list(m.state_dict())
    n = use_onednn_linear_(m)
    assert n == len(m.trf_blocks) * 6 + 1
    assert all(type(mod) is not nn.Linear for mod in m.modules())
    assert dict(m.named_parameters()) == before and list(m.state_dict()) == keys
    assert m.out_head.weight is m.tok_emb.weight


def test_optimized_model_generates_the_fp32_tokens_and_logits():
    ref, fast = model(), optimize_for_inference(model())
    assert isinstance(fast.trf_blocks[0].ff.layers[0], OneDNNLinear)
    idx = torch.randint(0, CFG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        assert torch.allclose(fast(idx), ref(idx), atol=1e-5)
    assert torch.equal(generate(fast, idx[:1, :4], 20), generate(ref, idx[:1, :4], 20))


def test_kernel_choice_and_a_build_without_onednn(monkeypatch):
    assert type(optimize_for_inference(model(), linear_kernel="aten").out_head) is nn.Linear
    with pytest.raises(ValueError, match="unknown linear_kernel 'mkl'"):
        optimize_for_inference(model(), linear_kernel="mkl")
    import modelkit.runtime.onednn

    monkeypatch.setattr(modelkit.runtime.onednn, "onednn_dtypes", lambda: frozenset())  # a build without the op
    monkeypatch.setattr(modelkit.runtime.onednn, "_DTYPES", frozenset())
    assert type(optimize_for_inference(model()).out_head) is nn.Linear  # auto: falls back quietly
    with pytest.raises(SpeedOptionError, match="linear_kernel='onednn': this PyTorch build has no working oneDNN"):
        optimize_for_inference(model(), linear_kernel="onednn")


@pytest.mark.parametrize("onednn_faster", [True, False], ids=["avx512", "avx2"])
def test_training_on_onednn_follows_the_f_linear_run_and_auto_takes_the_faster_kernel(monkeypatch, onednn_faster):
    # benchmarks/peers.py, training step: oneDNN 1.39-1.61x PyTorch's kernels with AVX-512, 0.87x with AVX2
    import modelkit.runtime.optimize
    from modelkit.training import TrainConfig, TrainError, train

    monkeypatch.setattr(modelkit.runtime.optimize, "onednn_trains_faster", lambda: onednn_faster)
    ids = torch.randint(0, CFG["vocab_size"], (600,), generator=torch.Generator().manual_seed(8)).tolist()
    runs, calls = {}, uses_onednn(monkeypatch)
    for kernel in ("aten", "onednn", "auto"):
        before = calls[0]
        config = TrainConfig(steps=6, batch_size=2, max_length=16, lr=3e-3, eval_every=100, linear_kernel=kernel)
        runs[kernel] = train(CFG, ids, config, progress=False)
        on_onednn = kernel == "onednn" or (kernel == "auto" and onednn_faster)
        assert (calls[0] > before) == on_onednn
        assert isinstance(runs[kernel].model.out_head, OneDNNLinear) == on_onednn
    aten, onednn = runs["aten"].losses(), runs["onednn"].losses()
    assert onednn == pytest.approx(aten, abs=1e-4) and len(set(aten)) == len(aten)
    with pytest.raises(TrainError, match="linear_kernel must be auto, aten or onednn"):
        TrainConfig(linear_kernel="mkl")


@pytest.mark.parametrize("activation", ["gelu", "gelu_exact", "relu", "silu"])
def test_fused_activation_computes_the_unfused_layers(activation):
    from modelkit.runtime.onednn import OneDNNLinearActivation

    ff = {"type": "mlp", "activation": activation}
    ref, fast = model(feedforward=ff), optimize_for_inference(model(feedforward=ff))
    layers = fast.trf_blocks[0].ff.layers
    assert isinstance(layers[0], OneDNNLinearActivation) and isinstance(layers[1], nn.Identity)
    assert list(fast.state_dict()) == list(ref.state_dict())
    idx = torch.randint(0, CFG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        assert torch.allclose(fast(idx), ref(idx), atol=1e-5)
    # with autograd recording, the fused layer is the Linear then the activation module
    fast.train()
    ref.train()
    torch.manual_seed(3)
    fast(idx).sum().backward()
    torch.manual_seed(3)
    ref(idx).sum().backward()
    w_fast, w_ref = fast.trf_blocks[1].ff.layers[0].weight.grad, ref.trf_blocks[1].ff.layers[0].weight.grad
    assert torch.allclose(w_fast, w_ref, atol=1e-5)


def test_quantizing_a_fused_model_is_refused_rather_than_dropping_activations():
    from modelkit.runtime.quantize import quantize_int8_

    with pytest.raises(ValueError, match="fused with their activations"):
        quantize_int8_(optimize_for_inference(model()))
    quantized = optimize_for_inference(model(), quantize="int8")  # the supported order
    assert not any(isinstance(m, OneDNNLinear) for m in quantized.modules())


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside Inductor
def test_optimized_model_compiles_with_inductor_keeps_its_tokens_and_its_onednn_matmuls(monkeypatch):
    # Inductor's own lowering of the oneDNN op rejects plain weights (a LoweringException, found by
    # benchmarks/peers.py); the custom op modelkit::onednn_linear keeps the kernel in compiled code.
    torch._dynamo.reset()
    ref = model()
    fast = model()
    if inductor_cpu_problem() is not None:  # a CPU below AVX2 (or one forced to act so): one clear error
        with pytest.raises(SpeedOptionError, match=re.escape(f"compile=True: {inductor_cpu_problem()}")):
            optimize_for_inference(fast, compile=True)
        return
    compiled = optimize_for_inference(fast, compile=True)
    n_linear = sum(isinstance(m, nn.Linear) for m in ref.modules())
    idx = torch.randint(0, CFG["vocab_size"], (1, 5), generator=torch.Generator().manual_seed(10))
    try:
        with torch.inference_mode():
            assert torch.allclose(compiled(idx), ref(idx), atol=1e-5)
            with monkeypatch.context() as patch:  # counted at run time, inside the compiled graph
                calls = uses_onednn(patch)
                out = compiled(idx)
            # (unpatched again: Inductor's passes look the op up when compiling)
            # Compiled code cannot check a stacked matrix's addresses: each layer is its own oneDNN call.
            assert calls[0] == n_linear
            assert torch.allclose(out, ref(idx), atol=1e-5)
        assert not any(isinstance(m, StackedLinear) for m in fast.modules())
        assert torch.equal(generate(compiled, idx, 8), generate(ref, idx, 8))
    finally:
        torch._dynamo.reset()


def _inductor_gradients_problem(idx: torch.Tensor) -> str | None:
    """Why Inductor's gradients of the model as built (no modelkit kernel in it) differ from eager
    ones on this CPU, or None. Seen with torch 2.13 on an AVX-512 AMD EPYC (Zen 5) with one thread
    under ATEN_CPU_CAPABILITY=avx2: NaN gradients, a PyTorch bug the test below cannot see past."""
    eager, plain = model().train(), model().train()
    try:
        eager(idx).square().mean().backward()
        torch.compile(plain)(idx).square().mean().backward()
    finally:
        torch._dynamo.reset()
    wrong = [n for (n, p), q in zip(eager.named_parameters(), plain.parameters())
             if not torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4)]
    if not wrong:
        return None
    return (f"PyTorch's Inductor computes wrong gradients for the plain model here ({', '.join(wrong[:3])}, ...; "
            f"PyTorch kernels {torch.backends.cpu.get_cpu_capability()}): a PyTorch bug, not modelkit's")


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inside Inductor
def test_compiled_training_step_takes_inductors_kernels_and_matches_eager_gradients(monkeypatch):
    if inductor_cpu_problem() is not None:
        pytest.skip(inductor_cpu_problem())
    torch._dynamo.reset()
    ref, fast = model().train(), model().train()
    idx = torch.randint(0, CFG["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(11))
    problem = _inductor_gradients_problem(idx)
    if problem is not None:
        pytest.skip(problem)
    use_onednn_linear_(fast)
    compiled = torch.compile(fast)
    try:
        torch.manual_seed(5)
        ref(idx).square().mean().backward()
        torch.manual_seed(5)
        compiled(idx).square().mean().backward()  # compiles
        for p in fast.parameters():
            p.grad = None
        with monkeypatch.context() as patch:
            calls = uses_onednn(patch)
            torch.manual_seed(5)
            compiled(idx).square().mean().backward()
        assert calls[0] == 0  # compiled autograd is Inductor's; the oneDNN backward is eager-only
        for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# q/k/v stacked into one matrix (modelkit.runtime.stacking)


def test_optimized_attention_reads_q_k_v_in_one_matmul_with_unchanged_parameters(monkeypatch):
    ref = model()
    fast = model()
    ids_before = {name: id(p) for name, p in fast.named_parameters()}
    optimize_for_inference(fast)
    assert all(type(blk.att.W_query) is StackedLinear and blk.att.W_query.group.members == [
        blk.att.W_query, blk.att.W_key, blk.att.W_value] for blk in fast.trf_blocks)
    assert {name: id(p) for name, p in fast.named_parameters()} == ids_before  # the same Parameter objects
    for (name, a), b in zip(ref.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), name  # names and values unchanged
    idx = torch.randint(0, CFG["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(12))
    n_linear = sum(isinstance(m, nn.Linear) for m in ref.modules())
    with torch.inference_mode():
        calls = uses_onednn(monkeypatch)
        out = fast(idx)
    assert calls[0] == n_linear - 2 * CFG["n_layers"]  # one call instead of three per attention
    with torch.inference_mode():
        assert torch.allclose(out, ref(idx), atol=1e-5)
        assert torch.equal(generate(fast, idx[:1], 8), generate(ref, idx[:1], 8))
    copied = copy.deepcopy(fast)  # parameters copied one by one: the copy's groups are released
    with torch.inference_mode():
        calls[0] = 0
        assert torch.allclose(copied(idx), out, atol=1e-6)
        assert calls[0] == n_linear
        optimize_for_inference(copied)  # stacks them again
        calls[0] = 0
        assert torch.allclose(copied(idx), out, atol=1e-6)
    assert calls[0] == n_linear - 2 * CFG["n_layers"]
    assert copied.trf_blocks[0].att.W_query.weight.data_ptr() != fast.trf_blocks[0].att.W_query.weight.data_ptr()


def test_stacked_q_k_v_fall_back_to_three_layers_when_observed_trained_or_moved(monkeypatch):
    ref, fast = model(), optimize_for_inference(model())
    att = fast.trf_blocks[0].att
    idx = torch.randint(0, CFG["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(13))
    seen = []
    handle = att.W_key.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    with torch.inference_mode():
        assert torch.allclose(fast(idx), ref(idx), atol=1e-5)
    handle.remove()
    assert seen == [(1, 6, CFG["emb_dim"])]  # the hook saw its layer run
    # Training after optimising: autograd takes the three layers; gradients as the reference's.
    fast.train(), ref.train()
    fast(idx).square().mean().backward()
    ref(idx).square().mean().backward()
    assert torch.allclose(att.W_value.weight.grad, ref.trf_blocks[0].att.W_value.weight.grad, atol=1e-6)
    fast.eval(), ref.eval()
    # Loading new weights in place updates the stacked matrix too.
    torch.manual_seed(99)
    other = build_model(CFG).eval()
    fast.load_state_dict(other.state_dict())
    with torch.inference_mode():
        assert torch.allclose(fast(idx), other(idx), atol=1e-5)
    # .to() moves the parameters out of the matrix: the group lets it go and the layers compute alone.
    fast.to(torch.float64)
    with torch.inference_mode():
        assert torch.allclose(fast(idx), other.double()(idx), atol=1e-10)
    assert att.W_query.group.weight is None


def test_a_block_of_a_wider_matrix_is_computed_by_f_linear_not_onednns_slow_copy(monkeypatch):
    torch.manual_seed(4)
    wide = torch.randn(40, 96).t()  # column-major (96, 40); rows 0..31 are a block with strides (1, 96)
    layer = OneDNNLinear.from_linear(nn.Linear(40, 32))
    layer.weight.data = wide[:32]
    x = torch.randn(3, 40)
    with torch.inference_mode():
        calls = uses_onednn(monkeypatch)
        out = layer(x)
    assert calls[0] == 0
    assert torch.allclose(out.double(), x.double() @ wide[:32].double().T + layer.bias.double(), atol=1e-5)


def test_stacking_refuses_layers_that_cannot_share_one_matrix():
    def lin(n_in: int, n_out: int, bias: bool = True) -> OneDNNLinear:
        return OneDNNLinear.from_linear(nn.Linear(n_in, n_out, bias=bias))

    with pytest.raises(ValueError, match="in_features"):
        StackedLinears([lin(8, 4), lin(6, 4)])
    with pytest.raises(ValueError, match="biases"):
        StackedLinears([lin(8, 4), lin(8, 4, bias=False)])


def test_checkpoint_of_an_optimized_model_round_trips(tmp_path):
    from modelkit import load_checkpoint, save_checkpoint

    fast = optimize_for_inference(model())
    save_checkpoint(fast, tmp_path / "m.safetensors")
    back = load_checkpoint(tmp_path / "m.safetensors").eval()
    for (name, a), b in zip(fast.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name
