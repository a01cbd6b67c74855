"""model.py: parity with transformers' Cohere2, masking, KV-cache generation, FP8, parameter and FLOP
counts."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from torch.nn.attention.flex_attention import create_mask

from hf import build_pair, to_cohere2_config
from model import (PRESETS, ChunkedCrossEntropy, Config, Linear, Transformer, attend, attention_masks,
                   attention_rule, apply_rope, convert_cohere2_state_dict, document_positions, generate,
                   rope_rotations, sample, scaled_mm)

SMALL = Config(vocab_size=256, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, window=8,
               max_seq_len=64)


def make_model(config=SMALL, seed=0, init_std=None):
    torch.manual_seed(seed)
    if init_std is not None:  # a sharper random model: greedy decoding then has no near-ties
        config = Config(**{**config.__dict__, "init_std": init_std})
    return Transformer(config).eval()


# --- parity with Hugging Face Cohere2 -----------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    Config(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, window=16),
    Config(vocab_size=300, dim=96, n_layers=8, n_heads=6, n_kv_heads=3, ffn_dim=160, window=7,
           rope_theta=10000.0, logit_scale=0.0625),
    Config(vocab_size=128, dim=32, n_layers=3, n_heads=4, n_kv_heads=1, ffn_dim=48, window=5,
           logit_scale=0.3),
])
def test_logits_match_transformers_cohere2(config):
    pytest.importorskip("transformers")
    hf, ours = build_pair(config, seed=1)
    for p in hf.parameters():  # a random LayerNorm weight too, so the norm's weight is exercised
        if p.dim() == 1:
            torch.nn.init.uniform_(p, 0.5, 1.5)
    ours.load_state_dict(convert_cohere2_state_dict(hf.state_dict()))
    idx = torch.randint(config.vocab_size, (2, 3 * config.window + 5))  # longer than 2x the window
    with torch.no_grad():
        diff = (hf(idx).logits - ours(idx)).abs().max().item()
    assert diff <= 1e-5


def test_greedy_generation_matches_transformers_generate():
    pytest.importorskip("transformers")
    hf, ours = build_pair(SMALL, seed=2)
    torch.manual_seed(3)
    for p in hf.parameters():  # sharper than the default init, so greedy decoding has no near-ties
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    ours.load_state_dict(convert_cohere2_state_dict(hf.state_dict()))
    prompt = torch.randint(SMALL.vocab_size, (1, 5))
    theirs = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False)[0, 5:].tolist()
    assert generate(ours, prompt.tolist(), 20, temperature=0) == [theirs]


def test_cohere2_config_round_trip_and_r7b_config():
    assert Config.from_cohere2(to_cohere2_config(SMALL)) == SMALL
    r7b_json = {  # the fields of Command R7B's config.json that decide the architecture
        "model_type": "cohere2", "vocab_size": 256000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "sliding_window": 4096,
        "sliding_window_pattern": 4, "rope_theta": 50000.0, "logit_scale": 0.25, "layer_norm_eps": 1e-5,
        "max_position_embeddings": 8192}
    assert Config.from_cohere2(r7b_json) == PRESETS["r7b"]
    with pytest.raises(ValueError, match="layer_types"):
        Config.from_cohere2({**r7b_json, "layer_types": ["full_attention"] * 32})


def test_convert_cohere2_state_dict_rejects_unknown_keys():
    hf_sd = {k: torch.zeros(1) for k in ("model.embed_tokens.weight", "model.norm.weight",
                                         "model.extra.weight")}
    with pytest.raises(ValueError, match="model.extra.weight|extra.weight"):
        convert_cohere2_state_dict(hf_sd)


# --- attention masks ----------------------------------------------------------------------------------------

def influence(model, position, seq_len=40):
    """Which output positions change when the token at `position` changes."""
    idx = torch.randint(model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    changed = idx.clone()
    changed[0, position] = (idx[0, position] + 1) % model.config.vocab_size
    with torch.no_grad():
        delta = (model(idx) - model(changed)).abs().amax(dim=-1)[0]
    return delta > 0


def test_sliding_window_layer_cannot_see_past_window():
    model = make_model(Config(**{**SMALL.__dict__, "n_layers": 1, "full_every": 2}))  # one sliding layer
    assert model.blocks[0].sliding
    seen = influence(model, position=10)
    window = SMALL.window
    assert not seen[:10].any()  # causal
    assert seen[10:10 + window].all()  # q - window < k <= q
    assert not seen[10 + window:].any()


def test_full_layer_sees_everything_before_it():
    model = make_model(Config(**{**SMALL.__dict__, "n_layers": 1, "full_every": 1}))  # one full NoPE layer
    assert not model.blocks[0].sliding
    seen = influence(model, position=3)
    assert not seen[:3].any() and seen[3:].all()


def test_layer_pattern_is_three_sliding_then_one_full():
    assert [PRESETS["command-a"].is_sliding(i) for i in range(8)] == [True, True, True, False] * 2


def test_rope_only_in_sliding_layers_nope_in_full_layers_and_both_see_relative_positions_only():
    model = make_model(init_std=0.2)  # SMALL: 3 sliding layers, then 1 full; sharp enough for RoPE to show
    x = torch.randn(1, 16, SMALL.dim)
    masks = dict(zip((True, False), attention_masks(None, 16, SMALL.window, x.device)))  # by block.sliding

    def layer(block, positions):  # one block on its own, at the given positions
        return block(x, rope_rotations(positions, SMALL.head_dim, SMALL.rope_theta), masks[block.sliding])

    positions, scrambled = torch.arange(16)[None], torch.randperm(64)[:16][None]
    assert [block.sliding for block in model.blocks] == [True, True, True, False]
    with torch.no_grad():
        for block in model.blocks:
            out = layer(block, positions)
            assert torch.allclose(layer(block, positions + 7), out, atol=1e-5)  # a shift changes nothing
            if block.sliding:  # RoPE: the positions matter
                assert (layer(block, scrambled) - out).abs().max() > 0.1
            else:  # NoPE: they are never read
                assert torch.equal(layer(block, scrambled), out)


def test_rope_as_one_complex_multiply_equals_rotating_the_pairs_written_out():
    """apply_rope against bench.py's written-out rotation of each interleaved pair (x[2i], x[2i+1]) by
    position * theta^(-2i / head_dim), forward and backward."""
    from bench import rope_pairs_apart

    x = torch.randn(2, 3, 17, 8, requires_grad=True)
    positions = torch.randint(0, 5000, (2, 17))
    rotations = rope_rotations(positions, 8, 10000.0)
    angles = positions[:, None, :, None].double() * 10000.0 ** (-torch.arange(0, 8, 2).double() / 8)
    assert torch.allclose(rotations.real.double(), angles.cos(), atol=1e-3)
    assert torch.allclose(rotations.imag.double(), angles.sin(), atol=1e-3)
    ours, written_out = apply_rope(x, rotations), rope_pairs_apart(x, rotations)
    assert torch.allclose(ours, written_out, atol=1e-6)
    grad = torch.randn_like(ours)
    assert torch.allclose(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(written_out, x, grad)[0],
                          atol=1e-6)


def test_document_positions_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 6, 6, 6]])
    assert document_positions(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]]


def test_packed_documents_give_the_same_logits_as_separate_runs():
    model = make_model()
    lengths = [7, 19, 12]  # the middle one is longer than 2x the window
    docs = [torch.randint(SMALL.vocab_size, (1, n)) for n in lengths]
    doc_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed = model(torch.cat(docs, dim=1), doc_ids=doc_ids)
        separate = torch.cat([model(doc) for doc in docs], dim=1)
    assert (packed - separate).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_gives_the_dense_mask_sdpa_logits_on_packed_rows_past_the_window(monkeypatch):
    """The GPU's kernel (flex_attention with a block mask; eager here, forward only) and the CPU's (SDPA with
    a dense mask) read masks built from one attention_rule; on packed rows of 2 blocks of 128 tokens and many
    windows, and on unpacked rows past the window, their logits agree."""
    model = make_model()
    doc_ids = torch.tensor([[0] * 40 + [1] * 120 + [2] * 40, [0] * 200])  # 200 tokens: not a whole block
    idx = torch.randint(SMALL.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0))
    logits = {}
    for kernel in ("sdpa", "flex"):
        monkeypatch.setattr("model.ATTENTION_KERNEL", kernel)
        with torch.no_grad():
            logits[kernel] = model(idx, doc_ids=doc_ids), model(idx)
    for flex, sdpa in zip(logits["flex"], logits["sdpa"]):
        assert (flex - sdpa).abs().max() < 1e-5


@pytest.mark.parametrize("block", [3, 8, 20])
def test_query_blocks_give_one_sdpa_calls_logits_and_gradients(monkeypatch, block):
    """Long rows attend in query blocks (model.QUERY_BLOCK), each to the keys it can see; on packed and
    unpacked rows many windows long, blocks shorter than, equal to and longer than the window (8) give the
    logits and gradients of one SDPA call over the whole dense mask, and so does a prompt's prefill."""
    model = make_model(init_std=0.3)
    doc_ids = torch.tensor([[0] * 13 + [1] * 50 + [2] * 27, [0] * 90])
    idx = torch.randint(SMALL.vocab_size, (2, 90), generator=torch.Generator().manual_seed(0))
    results = {}
    for size in (10_000, block):   # one call, then blocks
        monkeypatch.setattr("model.QUERY_BLOCK", size)
        model.zero_grad()
        packed = model(idx, doc_ids=doc_ids)
        (packed.square().mean() + model(idx).square().mean()).backward()
        prompts = [idx[0, :n].tolist() for n in (90, 41)]
        results[size] = (packed.detach(), [p.grad.clone() for p in model.parameters()],
                         generate(model, prompts, max_new_tokens=6, temperature=0))
    (one_logits, one_grads, one_replies), (logits, grads, replies) = results.values()
    assert (logits - one_logits).abs().max() < 1e-5
    for got, want in zip(grads, one_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    assert replies == one_replies


def test_cpu_attention_stays_fp32_under_bf16_autocast():
    """Under CPU bf16 autocast, model.attend computes in fp32 (its bf16 kernels are the slower ones there):
    bf16 inputs give the fp32 attention of those same (rounded) inputs, in fp32, gradients included."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, heads, 40, 8, generator=generator).bfloat16().requires_grad_()
               for heads in (4, 2, 2))
    mask = attention_masks(None, 40, 8, "cpu")[0].expand(2, 1, 40, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(q, k, v, mask, window=8)
    out.sum().backward()
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert out.dtype == torch.float32 and torch.allclose(out, want, atol=1e-6)
    assert q.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_dense_mask_is_flex_create_mask_of_the_rule_and_the_block_mask_skips_hidden_blocks():
    doc_ids = torch.tensor([[0] * 5 + [1] * 20 + [2] * 7, [3] * 32])
    for docs, batch in ((doc_ids, 2), (None, 1)):
        sliding = attention_masks(docs, 32, 4, "cpu")[0]
        assert torch.equal(sliding, create_mask(attention_rule(docs, 4), batch, 1, 32, 32, "cpu"))
    full = attention_masks(doc_ids, 32, 4, "cpu")[1]
    assert torch.equal(full, create_mask(attention_rule(doc_ids, None), 2, 1, 32, 32, "cpu"))
    sliding, full = attention_masks(None, 1024, SMALL.window, "cpu", flex=True)
    assert full is None  # unpacked rows: SDPA's own causal kernel
    assert sliding.sparsity() == 100 * (1 - 15 / 64)  # of 8 x 8 blocks, the diagonal and the one below it


# --- loss ---------------------------------------------------------------------------------------------------

def test_chunked_cross_entropy_matches_full_logits_loss_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)  # 37 rows: chunks of 8 leave a remainder
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(50, (37,))
    targets[[0, 5, 36]] = -100
    loss = ChunkedCrossEntropy.apply(hidden, weight, targets, 0.3, 8)
    grads = torch.autograd.grad(loss * 2.0, (hidden, weight))
    logits = (hidden * 0.3) @ weight.t()
    log_probs = logits - logits.exp().sum(-1, keepdim=True).log()  # written out, not F.cross_entropy
    keep = targets != -100
    reference = -log_probs[keep, targets[keep]].mean()
    reference_grads = torch.autograd.grad(reference * 2.0, (hidden, weight))
    assert torch.allclose(loss, reference, atol=1e-6)
    for got, want in zip(grads, reference_grads):
        assert torch.allclose(got, want, atol=1e-6)


def test_bf16_autocast_loss_stays_close_to_fp32_and_keeps_fp32_logits():
    model = make_model()
    idx = torch.randint(SMALL.vocab_size, (2, 30))
    with torch.no_grad():
        fp32 = model.loss(idx, idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.loss(idx, idx)
            logits = model(idx)
    assert logits.dtype == torch.float32
    assert abs(bf16.item() - fp32.item()) < 0.01 * fp32.item()


def test_output_projection_runs_in_fp32_under_bf16_autocast():
    model = make_model()
    idx = torch.randint(SMALL.vocab_size, (2, 30))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.hidden_states(idx)  # the blocks ran in bf16
            logits, loss = model.logits(hidden), model.loss(idx, idx)
        scaled, weight = hidden.float() * SMALL.output_scale, model.embed.weight
        fp32, bf16 = F.linear(scaled, weight), F.linear(scaled.bfloat16(), weight.bfloat16()).float()
    relative = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()  # noqa: E731
    assert relative(logits, fp32) < 1e-6 < 1e-4 < relative(bf16, fp32)
    cross_entropy = lambda x: F.cross_entropy(x.flatten(0, 1), idx.flatten())  # noqa: E731
    assert relative(loss, cross_entropy(fp32)) < 1e-6 < relative(cross_entropy(bf16), cross_entropy(fp32))


def test_model_loss_equals_cross_entropy_of_its_logits_with_the_same_gradients():
    """The loss projects only the scored positions to logits; loss and gradients are those of the full
    logits' cross-entropy, with a few or most targets masked; with none scored the loss is 0."""
    model = make_model()
    idx = torch.randint(SMALL.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    for masked in (4, 50):
        targets = torch.randint(SMALL.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
        targets.view(-1)[torch.randperm(60, generator=torch.Generator().manual_seed(2))[:masked]] = -100
        loss = model.loss(idx, targets)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        expected = F.cross_entropy(model(idx).flatten(0, 1), targets.flatten(), ignore_index=-100)
        expected_grads = torch.autograd.grad(expected, list(model.parameters()))
        assert torch.allclose(loss, expected, atol=1e-6)
        for got, want in zip(grads, expected_grads, strict=True):
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-4)
    assert model.loss(idx, torch.full((2, 30), -100)).item() == 0


# --- generation ---------------------------------------------------------------------------------------------

def uncached_greedy(model, prompt, max_new_tokens):
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        with torch.no_grad():
            tokens.append(model(torch.tensor([tokens]))[0, -1].argmax().item())
    return tokens[len(prompt):]


def test_cached_greedy_generation_equals_uncached_across_lengths_and_past_the_window():
    model = make_model(init_std=0.3)
    prompts = [torch.randint(SMALL.vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (1, 5, 13, 22)]  # shorter and longer than the window of 8
    cached = generate(model, prompts, max_new_tokens=25, temperature=0)
    assert cached == [uncached_greedy(model, p, 25) for p in prompts]


def test_rolling_cache_never_holds_more_than_window_keys_in_sliding_layers():
    model = make_model()
    prompts = [[1] * 30, [2] * 3]
    _, cache = generate(model, prompts, max_new_tokens=20, temperature=0, return_cache=True)
    for layer, block in enumerate(model.blocks):
        expected = SMALL.window if block.sliding else 30 + 20
        assert cache.keys[layer].shape[2] == cache.values[layer].shape[2] == expected


def test_kv_cache_at_8x_window_is_11_32nds_of_a_full_cache():
    model = make_model()
    length = 8 * SMALL.window
    _, cache = generate(model, [[1] * (length - 1)], 1, temperature=0, return_cache=True)
    full = SMALL.n_layers * length * 2 * SMALL.n_kv_heads * SMALL.head_dim * 4
    assert cache.nbytes() * 32 == full * 11  # 3 layers of `window` slots + 1 of 8 windows, over 4 x 8 windows


def test_generation_stops_at_a_stop_token_and_keeps_it():
    model = make_model(init_std=0.3)
    free = generate(model, [[3, 4, 5]], 12, temperature=0)[0]
    stop = free[4]
    stopped = generate(model, [[3, 4, 5]], 12, temperature=0, stop_tokens=[stop])[0]
    assert stopped == free[: free.index(stop) + 1]


def test_on_token_sees_each_step_as_it_is_sampled():
    model = make_model(init_std=0.3)
    steps = []
    outputs = generate(model, [[3, 4, 5], [6]], 9, temperature=0, on_token=lambda t: steps.append(t.tolist()))
    assert [list(row) for row in zip(*steps)] == outputs


def test_sampling_is_reproducible_and_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(2000, 4)
    draws = sample(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7: tokens 2 and 3 are cut
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.05
    assert torch.equal(draws, sample(logits, 1.0, 0.7, torch.Generator().manual_seed(0)))
    assert sample(logits[:1], 0, 1.0).item() == 0


# --- FP8 ----------------------------------------------------------------------------------------------------

def relative_error(got, want):
    return ((got - want).norm() / want.norm()).item()


def test_fp8_linear_forward_and_backward_stay_close_to_fp32():
    torch.manual_seed(0)
    linear = Linear(256, 512)
    x = torch.randn(4, 60, 256, requires_grad=True)  # 240 rows: padded to a multiple of 16 internally
    grad_out = torch.randn(4, 60, 512)
    master = linear.weight.detach().clone()
    results = []
    for fp8 in (False, True):
        linear.fp8 = fp8
        y = linear(x)
        x_grad, w_grad = torch.autograd.grad(y, (x, linear.weight), grad_out)
        results.append((y.detach(), x_grad, w_grad))
    (y32, dx32, dw32), (y8, dx8, dw8) = results
    assert relative_error(y8, y32) < 0.06  # e4m3: 3 mantissa bits
    assert relative_error(dx8, dx32) < 0.10 and relative_error(dw8, dw32) < 0.10  # e5m2 gradients: 2 bits
    assert dw8.dtype == torch.float32 and torch.equal(linear.weight, master)  # fp32 master weight untouched


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_cpu_fp8_matmul_agrees_with_torch_scaled_mm(out_dtype):
    torch.manual_seed(0)
    a = (torch.randn(32, 64) * 3).to(torch.float8_e4m3fn)
    b = torch.randn(48, 64).to(torch.float8_e5m2).t()  # mixed formats, as in the backward pass
    a_inv, b_inv = torch.tensor(0.37), torch.tensor(1.9)
    ours = scaled_mm(a, b, a_inv, b_inv, out_dtype).float()
    theirs = torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype).float()
    if out_dtype == torch.float32:  # fp32 accumulation in another order: rounding-level differences
        assert (ours - theirs).abs().max() <= 1e-6 * theirs.abs().max()
    else:  # bf16 outputs at most one rounding step (2^-8 relative) apart
        assert ((ours - theirs).abs() <= 2 ** -7 * theirs.abs()).all()


def test_fp8_matmul_enforces_the_gpu_layout_rules():
    a = torch.randn(32, 64).to(torch.float8_e4m3fn)
    b = torch.randn(48, 64).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0)
    scaled_mm(a, b.t(), one, one, torch.float32)  # row-major @ column-major: fine
    with pytest.raises(RuntimeError, match="row-major"):
        scaled_mm(a.t().contiguous().t(), b.t(), one, one, torch.float32)
    with pytest.raises(RuntimeError, match="column-major"):
        scaled_mm(a, b.t().contiguous(), one, one, torch.float32)
    with pytest.raises(RuntimeError, match="multiples of 16"):
        scaled_mm(a[:, :40].contiguous(), b[:, :40].t(), one, one, torch.float32)
    with pytest.raises(ValueError, match="multiples of 16"):
        Transformer(Config(**{**SMALL.__dict__, "ffn_dim": 120})).set_fp8(True)


def train_losses(fp8, steps=30):
    model = make_model().train()
    model.set_fp8(fp8)
    assert all(b.in_proj.fp8 == b.out_proj.fp8 == fp8 for b in model.blocks)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.arange(33).repeat(4, 1) % 11  # a repeating pattern a model can learn in a few steps
    losses = []
    for _ in range(steps):
        loss = model.loss(data[:, :-1], data[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_tiny_model_trains_in_fp8_like_in_fp32():
    fp8, fp32 = train_losses(fp8=True), train_losses(fp8=False)
    assert fp8[-1] < 0.3 * fp8[0]
    assert abs(fp8[-1] - fp32[-1]) < 0.2 * fp32[-1]


def test_fp8_switches_on_and_off_at_run_time():
    model = make_model()
    idx = torch.randint(SMALL.vocab_size, (2, 16))
    with torch.no_grad():
        reference = model(idx)
        model.set_fp8(True)
        assert not torch.equal(model(idx), reference)  # the matmuls really ran in FP8
        model.set_fp8(False)
        assert torch.equal(model(idx), reference)


# --- sizes, FLOPs, bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, billions", [("command-a", 111.06), ("r7b", 8.03)])
def test_full_size_presets_build_on_meta_with_the_reported_parameter_count(preset, billions):
    config = PRESETS[preset]
    with torch.device("meta"):
        model = Transformer(config)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == config.num_params()
    assert round(n_params / 1e9, 2) == billions


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_num_params_equals_the_built_models_count(preset):
    with torch.device("meta"):
        model = Transformer(PRESETS[preset])
    assert sum(p.numel() for p in model.parameters()) == PRESETS[preset].num_params()


def test_flops_per_token_counts_every_matmul_and_the_windowed_attention():
    config = SMALL  # window 8, 4 layers: 3 sliding + 1 full
    model = make_model()
    idx = torch.randint(config.vocab_size, (2, 32))
    with FlopCounterMode(display=False) as counter:  # counts the matmuls (the CPU SDPA kernel is not counted)
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    matmul_flops = counter.get_flop_counts()["Global"][torch.ops.aten.mm]
    attention_per_token = 12 * config.n_heads * config.head_dim * (3 * 8 + 32)  # QK^T and AV, fwd + bwd
    assert config.flops_per_token(32) * idx.numel() == matmul_flops + attention_per_token * idx.numel()


@pytest.mark.parametrize("change, field", [
    ({"n_kv_heads": 3}, "n_kv_heads"), ({"window": 0}, "window"), ({"dim": 66}, "dim"),
    ({"n_layers": -1}, "n_layers"), ({"dim": 36, "n_heads": 12, "n_kv_heads": 4}, "even"),
])
def test_inconsistent_config_raises_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        Config(**{**SMALL.__dict__, **change})


def test_loading_a_wrong_shape_names_the_key_and_both_shapes():
    model = make_model()
    state = model.state_dict()
    state["blocks.2.in_proj.weight"] = torch.zeros(7, 64)
    with pytest.raises(ValueError) as error:
        model.load_state_dict(state)
    message = str(error.value)
    assert "blocks.2.in_proj.weight" in message and "(7, 64)" in message
    assert str(tuple(model.blocks[2].in_proj.weight.shape)) in message


def test_sequence_logps_of_packed_sequences_equal_each_sequence_scored_alone():
    model = make_model()
    g = torch.Generator().manual_seed(4)
    sequences = [torch.randint(SMALL.vocab_size, (n,), generator=g) for n in (6, 11, 9)]
    scored_from = [2, 5, 1]  # the completion starts here; earlier targets are prompt (-100)
    tokens = torch.cat(sequences)[None]
    doc_ids = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sequences)])[None]
    targets = torch.full_like(tokens, -100)
    start = 0
    for s, first in zip(sequences, scored_from):
        # target t is token t + 1 of the sequence
        targets[0, start + first - 1:start + len(s) - 1] = s[first:]
        start += len(s)
    with torch.no_grad():
        summed = model.sequence_logps(tokens, targets, doc_ids, n_sequences=3)
        averaged = model.sequence_logps(tokens, targets, doc_ids, n_sequences=3, average=True)
        for i, (s, first) in enumerate(zip(sequences, scored_from)):
            log_probs = torch.log_softmax(model(s[None])[0], dim=-1)
            expected = sum(log_probs[t - 1, s[t]] for t in range(first, len(s)))
            assert summed[i].item() == pytest.approx(expected.item(), abs=1e-4)
            assert averaged[i].item() == pytest.approx(expected.item() / (len(s) - first), abs=1e-5)
