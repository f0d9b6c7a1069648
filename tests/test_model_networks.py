"""The model's networks, fusion, projection, the SketchToFace pipeline and its model folders.

Everything runs on tiny configs (resolution 192, the smallest whose component windows reach
the 64 px the networks need, a few channels each) or on the meta device, which builds the
full-size 512 model without allocating its 563M parameters.
"""
from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dfd_data.atomic import sha256_file
from dfd_data.components import COMPONENTS, component_windows
from dfd_data.devices import prepare_for_inference
from dfd_data.errors import ModelMissingError
from dfd_model.checkpoint import BANKS_FILE, CONFIG_FILE, WEIGHTS_FILE, CheckpointError, save_pretrained
from dfd_model.config import ModelConfig
from dfd_model.networks import (ComponentAutoEncoder, ComponentDecoder, ComponentEncoder, FeatureDecoder,
                                GlobalGenerator, MultiscaleDiscriminator, NLayerDiscriminator, count_parameters,
                                denormalize_image, fuse_feature_maps, normalize_sketch)
from dfd_model.int8_scores import MAX_WIDTH, int8_product_runs
from dfd_model.projection import LOW_PRECISION_ROWS, FeatureBank, SearchIndex, blend, project
from dfd_model.sketch_to_face import SketchToFace, crop_sketch_components

TINY = dict(resolution=192, latent_dim=32, ce_base_channels=4, fm_base_channels=4, fm_channels=8, ngf=8,
            n_blocks=1, ndf=8, n_layers_d=3, num_d=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny() -> ModelConfig:
    return ModelConfig(**TINY)


def random_banks(latent_dim: int, seed: int = 0) -> FeatureBank:
    generator = torch.Generator().manual_seed(seed)
    return FeatureBank({name: {"female": torch.randn(24, latent_dim, generator=generator),
                               "male": torch.randn(9, latent_dim, generator=generator)} for name in COMPONENTS})


def random_sketches(batch: int, resolution: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    sketch = np.full((batch, resolution, resolution), 255, np.uint8)
    sketch[rng.random(sketch.shape) < 0.08] = 0
    return torch.from_numpy(sketch)


# ---- networks ---------------------------------------------------------------------------------
def test_every_network_has_the_documented_shapes(tiny):
    sizes = tiny.component_sizes()
    assert sizes == {"left_eye": 64, "right_eye": 64, "nose": 64, "mouth": 64, "remainder": 192}
    crop = torch.randn(2, 1, 64, 64)
    encoder, decoder = ComponentEncoder(64, tiny), ComponentDecoder(64, tiny)
    latent = encoder(crop)
    assert latent.shape == (2, 32)
    assert decoder(latent).shape == (2, 1, 64, 64)
    assert FeatureDecoder(64, tiny)(latent).shape == (2, 8, 64, 64)
    assert FeatureDecoder(192, tiny)(torch.randn(2, 32)).shape == (2, 8, 192, 192)
    assert ComponentAutoEncoder(64, tiny)(crop).shape == (2, 1, 64, 64)
    assert ComponentEncoder(192, tiny).fc.in_features == 64 * 6 * 6  # 16 * base channels x (192/32)^2

    face = GlobalGenerator(tiny)(torch.randn(2, 8, 192, 192))
    assert face.shape == (2, 3, 192, 192) and face.abs().max() <= 1

    outputs = MultiscaleDiscriminator(tiny)(torch.randn(2, 8, 192, 192), face)
    assert len(outputs) == 2 and all(len(features) == 5 for features in outputs)
    assert [f.shape[1] for f in outputs[0]] == [8, 16, 32, 64, 1]
    # pix2pixHD padding 2: 192 -> 97 -> 49 -> 25 (s2) -> 26 -> 27 (s1); the 1/2 scale starts at 96
    assert outputs[0][-1].shape == (2, 1, 27, 27) and outputs[1][-1].shape == (2, 1, 15, 15)
    assert len(NLayerDiscriminator(4, 8, n_layers=1)(torch.randn(1, 4, 32, 32))) == 3

    with pytest.raises(ValueError, match=r"expects a tensor shaped \[B, 1, 64, 64\]"):
        encoder(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="latents shaped"):
        decoder(torch.randn(2, 31))
    with pytest.raises(ValueError, match="multiple of 32"):
        ComponentEncoder(48, tiny)


def test_128_px_models_pad_their_1x1_latent_grid_by_replication():
    """At 128 px the eye and nose windows are 32 px, so the encoders end on a 1x1 grid where
    reflection padding is undefined; the whole model must still run and train."""
    config = ModelConfig(**{**TINY, "resolution": 128})
    assert config.component_sizes() == {"left_eye": 32, "right_eye": 32, "nose": 32, "mouth": 64, "remainder": 128}
    encoder = ComponentEncoder(32, config)
    pads = {type(m).__name__ for m in encoder.last_block.modules()}
    assert "ReplicationPad2d" in pads and "ReflectionPad2d" not in pads
    model = SketchToFace(config)
    face = model(torch.randint(0, 256, (2, 128, 128), dtype=torch.uint8))
    assert face.shape == (2, 3, 128, 128)
    face.mean().backward()
    assert model.autoencoders["left_eye"].encoder.last_block.block[1].weight.grad.abs().sum() > 0


def test_encoder_slope_one_is_the_released_identity(tiny):
    released = ModelConfig(**{**TINY, "encoder_slope": 1.0})
    names = {type(m).__name__ for m in ComponentEncoder(64, released).modules()}
    assert "LeakyReLU" not in names and "Identity" in names
    slopes = {m.negative_slope for m in ComponentDecoder(64, tiny).modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.2}
    # the activation has no weights, so both variants share one state-dict layout
    assert ComponentEncoder(64, released).state_dict().keys() == ComponentEncoder(64, tiny).state_dict().keys()


def test_sketch_normalisation_round_trips():
    pixels = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8)
    normalised = normalize_sketch(pixels)
    assert normalised[0] == -1 and normalised[-1] == 1 and normalised.dtype == torch.float32
    assert torch.equal(denormalize_image(normalised), pixels)
    assert denormalize_image(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]
    assert normalize_sketch(np.full((2, 2), 255, np.uint8)).eq(1).all()
    with pytest.raises(ValueError, match="uint8"):
        normalize_sketch(torch.zeros(3))


def test_full_size_model_matches_the_released_parameter_counts():
    config = ModelConfig()
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = SketchToFace(config)
        discriminator = MultiscaleDiscriminator(config)
    assert next(model.parameters()).is_meta
    # Generator, ngf 56: conv7 32->56 (87,864) + four downs (4,799,760) + nine 896-channel
    # residual blocks (130,072,320) + four ups (4,798,920) + conv7 56->3 (8,235) = 139,767,099.
    assert count_parameters(model.generator) == 139_767_099
    # The remainder encoder's Linear: 512 * 16 * 16 inputs -> 512 latents, plus bias.
    assert count_parameters(model.autoencoders["remainder"].encoder.fc) == 512 * 16 * 16 * 512 + 512 == 67_109_376
    assert count_parameters(model.autoencoders["remainder"].encoder) == 76_189_408  # 9,080,032 conv body
    # The remainder image decoder's Linear: 512 -> 131,072 plus bias = 67,239,936.
    assert count_parameters(model.autoencoders["remainder"].decoder.fc) == 67_239_936
    assert count_parameters(model.feature_decoders["remainder"]) == 78_688_032
    assert count_parameters(model.autoencoders["left_eye"].encoder) == 13_274_848  # Linear 4,194,816
    # Everything SketchToFace holds: 5 encoders + 5 image decoders + 5 feature decoders + G.
    assert count_parameters(model) == 562_801_888
    # Two PatchGAN scales on 32 + 3 channels: 2 x 2,797,505.
    assert count_parameters(discriminator) == 5_595_010
    # The analytic counts (used to refuse huge configs before building) agree network by network.
    counts = config.parameter_counts()
    for name in COMPONENTS:
        assert counts[f"encoder.{name}"] == count_parameters(model.autoencoders[name].encoder)
        assert counts[f"image_decoder.{name}"] == count_parameters(model.autoencoders[name].decoder)
        assert counts[f"feature_decoder.{name}"] == count_parameters(model.feature_decoders[name])
    assert counts["generator"] == 139_767_099 and counts["discriminator"] == 5_595_010


def test_analytic_counts_follow_every_option():
    config = ModelConfig(**{**TINY, "instance_norm_affine": True, "d_condition": "sketch", "n_layers_d": 2,
                            "num_d": 3, "n_downsample": 2, "n_blocks": 2})
    with torch.device("meta"):
        model, discriminator = SketchToFace(config), MultiscaleDiscriminator(config)
    counts = config.parameter_counts()
    assert counts["generator"] == count_parameters(model.generator)
    assert counts["discriminator"] == count_parameters(discriminator)
    assert sum(counts.values()) == count_parameters(model) + count_parameters(discriminator)


# ---- fusion -------------------------------------------------------------------------------------
def constant_maps(config: ModelConfig, channels: int = 1) -> dict[str, torch.Tensor]:
    sizes = config.component_sizes()
    return {name: torch.full((1, channels, sizes[name], sizes[name]), float(value))
            for value, name in enumerate(["remainder", "mouth", "nose", "left_eye", "right_eye"])}


def test_fusion_overwrites_the_released_windows_in_order():
    config = ModelConfig()
    maps = constant_maps(config)
    # the nose map carries its row index, to show which rows land where
    maps["nose"] = 10 + torch.arange(160, dtype=torch.float32).view(1, 1, 160, 1).expand(1, 1, 160, 160)
    fused = fuse_feature_maps(maps, config)[0, 0]
    assert fused.shape == (512, 512)
    assert fused[10, 10] == 0 and fused[500, 100] == 0           # remainder outside every window
    assert fused[400, 170] == 1 and fused[492, 360] == 1          # mouth, x 169..360, y 301..492
    assert fused[300, 200] == 10 + (300 - 232)                    # nose over the mouth, its own row 68
    assert fused[355, 200] == 10 + 123 and fused[356, 200] == 1   # only the top 124 nose rows are written
    assert fused[250, 245] == 10 + 18                             # nose between the eyes (x 236..254)
    assert fused[250, 200] == 3 and fused[156, 108] == 3          # left eye over the nose
    assert fused[250, 300] == 4 and fused[283, 382] == 4          # right eye, x 255..382
    assert fused[250, 383] == 0 and fused[284, 300] == 10 + 52      # right of both; below the eyes
    assert fused[320, 341] == 10 + 88 and fused[320, 342] == 1      # the nose's right edge, then mouth
    # and nothing else: rebuild the expected canvas by painting in the documented order
    expected = torch.zeros(512, 512)
    for name, (x, y, size, rows) in {"mouth": (169, 301, 192, 192), "nose": (182, 232, 160, 124),
                                     "left_eye": (108, 156, 128, 128), "right_eye": (255, 156, 128, 128)}.items():
        expected[y:y + rows, x:x + size] = maps[name][0, 0, :rows]
    assert torch.equal(fused, expected)


def test_fusion_at_a_small_resolution_follows_the_scaled_windows(tiny):
    windows = component_windows(192)
    assert windows["right_eye"].x < windows["left_eye"].x + windows["left_eye"].size  # the eyes overlap here
    assert tiny.nose_rows == 47  # 124 * 192/512 = 46.5, rounded half up
    maps = constant_maps(tiny, channels=3)
    fused = fuse_feature_maps(maps, tiny)
    expected = torch.zeros(192, 192)
    for value, name in [(1, "mouth"), (2, "nose"), (3, "left_eye"), (4, "right_eye")]:
        w = windows[name]
        rows = 47 if name == "nose" else w.size
        expected[w.y:w.y + rows, w.x:w.x + w.size] = value
    assert torch.equal(fused[0, 1], expected)
    assert maps["remainder"].eq(0).all(), "fusion must not modify its inputs"
    for part in maps.values():
        part.requires_grad_(True)
    fuse_feature_maps(maps, tiny).sum().backward()
    assert all(part.grad.abs().sum() > 0 for part in maps.values()), "gradients reach every written map"
    assert maps["nose"].grad[0, 0, 47:].eq(0).all() and maps["nose"].grad[0, 0, 46, 10] == 1
    maps["mouth"] = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="the mouth map must be"):
        fuse_feature_maps(maps, tiny)


def test_nose_rows_scale_and_can_be_set():
    assert ModelConfig().nose_rows == 124
    assert ModelConfig(resolution=256).nose_rows == 62
    assert ModelConfig(resolution=1024).nose_rows == 248
    assert ModelConfig(nose_fusion_rows=160).nose_rows == 160
    with pytest.raises(ValueError, match="exceeds the nose window"):
        ModelConfig(nose_fusion_rows=161)


# ---- projection ---------------------------------------------------------------------------------
def test_projection_weights_sum_to_one_and_bank_vectors_project_onto_themselves():
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(300, 48, generator=generator)
    query = bank[[3, 70, 299]]
    projected, indices, weights = project(query, bank, k=10)
    assert indices.shape == weights.shape == (3, 10) and indices.dtype == torch.long
    assert indices[:, 0].tolist() == [3, 70, 299]  # nearest first
    assert torch.allclose(weights.sum(1), torch.ones(3), atol=1e-6)
    assert (projected - query).abs().max() <= 1e-5
    assert torch.allclose(weights[:, 0], torch.ones(3)) and weights[:, 1:].abs().max() <= 1e-6
    # textbook LLE with the trace ridge leans towards uniform weights: one-hot-ish, not exact
    projected, indices, weights = project(query, bank, k=10, method="gram")
    assert torch.allclose(weights.sum(1), torch.ones(3), atol=1e-6)
    assert (weights[:, 0] > 0.9).all() and indices[:, 0].tolist() == [3, 70, 299]


@pytest.mark.parametrize("method", ["anchored", "gram"])
def test_a_noisy_query_moves_onto_the_banks_subspace(method):
    generator = torch.Generator().manual_seed(2)
    basis, _ = torch.linalg.qr(torch.randn(40, 4, generator=generator))   # a 4-d affine subspace of R^40
    centre = torch.randn(40, generator=generator)
    bank = centre + torch.randn(500, 4, generator=generator) @ basis.T
    clean = centre + torch.randn(6, 4, generator=generator) @ basis.T
    noise = torch.randn(6, 40, generator=generator)
    noise = 0.2 * (noise - (noise @ basis) @ basis.T)                      # off the subspace only
    query = clean + noise

    def off_subspace(points):
        offsets = points - centre
        return (offsets - (offsets @ basis) @ basis.T).norm(dim=1)

    projected, _, weights = project(query, bank, k=10, method=method)
    assert torch.allclose(weights.sum(1), torch.ones(6), atol=1e-5)
    assert (off_subspace(query) > 0.1).all()
    assert (off_subspace(projected) < 1e-4).all()  # affine combinations of its points stay on it
    assert ((projected - clean).norm(dim=1) < (query - clean).norm(dim=1)).all()


def test_projection_edge_cases():
    bank = torch.randn(3, 8)
    projected, indices, weights = project(torch.randn(2, 8), bank, k=10)
    assert indices.shape == weights.shape == (2, 3) and sorted(indices[0].tolist()) == [0, 1, 2]
    assert torch.allclose(weights.sum(1), torch.ones(2), atol=1e-6)
    projected, indices, weights = project(torch.randn(2, 8), bank[:1], k=5)
    assert weights.tolist() == [[1.0], [1.0]] and torch.equal(projected, bank[:1].expand(2, 8))
    same = torch.ones(12, 8)  # every neighbour identical: the trace guard keeps the solve finite
    for method in ("anchored", "gram"):
        projected, _, weights = project(torch.zeros(1, 8), same, k=4, method=method)
        assert torch.allclose(projected, torch.ones(1, 8)) and torch.isfinite(weights).all()
    # many more neighbours than dimensions: the ridge keeps the system solvable
    projected, _, weights = project(torch.randn(2, 3), torch.randn(50, 3), k=20)
    assert torch.isfinite(projected).all() and torch.allclose(weights.sum(1), torch.ones(2), atol=1e-5)
    # tensors that require grad (a latent straight from a training encoder) project as others do
    wide = torch.randn(4000, 8)
    plain = project(torch.ones(1, 8), wide, k=5, index=SearchIndex.of(wide))
    tracked_bank = wide.clone().requires_grad_()
    tracked = project(torch.ones(1, 8, requires_grad=True), tracked_bank, k=5,
                      index=SearchIndex.of(tracked_bank))
    assert all(torch.equal(a, b) for a, b in zip(plain, tracked))

    with pytest.raises(ValueError, match="empty"):
        project(torch.randn(1, 8), torch.empty(0, 8))
    with pytest.raises(ValueError, match="empty"):
        FeatureBank({"nose": torch.empty(0, 8)})
    for empty_rows in (torch.empty(5, 0), torch.empty(LOW_PRECISION_ROWS + 1, 0)):  # (a large one: no copy to make)
        with pytest.raises(ValueError, match="empty"):
            FeatureBank({"nose": empty_rows})
        with pytest.raises(ValueError, match="empty"):
            project(torch.randn(1, 0), empty_rows)
    with pytest.raises(ValueError, match="8 values"):
        project(torch.randn(1, 8), torch.randn(5, 7))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        project(torch.randn(8), bank)
    with pytest.raises(ValueError, match="k must be"):
        project(torch.randn(1, 8), bank, k=0)
    with pytest.raises(ValueError, match="NaN"):
        project(torch.full((1, 8), float("nan")), bank)


def test_blend_limits_and_validation():
    f, f_proj = torch.randn(2, 8), torch.randn(2, 8)
    assert torch.equal(blend(f, f_proj, 0), f)
    assert torch.equal(blend(f, f_proj, 1.0), f_proj)
    assert torch.allclose(blend(f, f_proj, 0.25), 0.25 * f_proj + 0.75 * f)
    for bad in (-0.01, 1.01, float("nan"), True, "1", None):
        with pytest.raises(ValueError, match="refine must be a number from 0"):
            blend(f, f_proj, bad)


def test_feature_bank_genders():
    banks = random_banks(4)
    assert banks.genders() == ("female", "male")
    assert banks.get("nose", "male").shape == (9, 4)
    assert banks.get("nose").shape == (33, 4)  # no "all" bank: every gender together
    assert FeatureBank({"nose": torch.zeros(2, 4)}).get("nose").shape == (2, 4)
    assert banks.counts()["mouth"] == {"female": 24, "male": 9}
    with pytest.raises(ValueError, match="no gender 'other'"):
        banks.get("nose", "other")
    with pytest.raises(ValueError, match="differs"):
        FeatureBank({"nose": torch.zeros(2, 4), "mouth": torch.zeros(2, 5)})


def test_searching_every_gender_takes_a_face_without_gender_once():
    """Training puts faces without a recorded gender in every gender's bank; searching every
    gender (gender=None, the default) must not offer such a face twice, where the copy took
    a neighbour's place with weight 0."""
    generator = torch.Generator().manual_seed(5)
    female, male, unknown = (torch.randn(n, 6, generator=generator) for n in (3, 2, 2))
    banks = FeatureBank({"nose": {"female": torch.cat([female, unknown]), "male": torch.cat([male, unknown])}})
    pooled = banks.get("nose")
    assert torch.equal(pooled, torch.cat([female, unknown, male]))  # each vector once, in bank order
    _, indices, _ = project(unknown[:1] + 0.01, pooled, k=4, index=banks.index("nose"))
    assert len(set(indices[0].tolist())) == 4


def test_a_bad_bank_or_an_index_of_another_tensor_is_refused_and_a_cast_model_searches_exactly(tiny):
    """A bank the index cannot bound (NaN, or norms past float32) is one line, not a silently
    dropped neighbour. A search index holds its bank's norms (and bf16 rows): used with another
    tensor (the bank cast to a bf16 model's dtype, as the pipeline once did) it ranked far rows
    first."""
    bank = torch.randn(3000, 16)
    for bad in (float("nan"), 1e20):  # a NaN, or a row whose squared norm overflows float32
        broken = bank.clone()
        broken[7, 3] = bad
        with pytest.raises(ValueError, match="NaN or infinite values, or rows too long"):
            project(torch.randn(1, 16), broken, k=5)
    with pytest.raises(ValueError, match="built from another tensor"):
        project(torch.randn(1, 16).bfloat16(), bank.bfloat16(), k=5, index=SearchIndex.of(bank))
    square = torch.randn(16, 16)
    with pytest.raises(ValueError, match="built from another tensor"):  # the same memory read another way
        project(torch.randn(1, 16), square.T, k=5, index=SearchIndex.of(square))
    torch.manual_seed(0)
    model = SketchToFace(tiny).eval().to(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    model.set_banks(FeatureBank({name: {"male": torch.randn(500, tiny.latent_dim, generator=generator)}
                                 for name in COMPONENTS}))  # float32 banks beside bf16 weights
    with torch.no_grad():
        latents, matches = model.encode_and_match(random_sketches(1, 192), refine=0.0, gender="male")
    for name, match in matches.items():
        bank = model.banks.get(name, "male")
        exact = torch.cdist(latents[name].float(), bank, compute_mode="donot_use_mm_for_euclid_dist")
        assert torch.equal(match.indices[0], torch.topk(exact, match.indices.shape[1], largest=False)[1][0]), name


# ---- the pipeline --------------------------------------------------------------------------------
def test_sketch_to_face_pipeline(tiny):
    torch.manual_seed(0)
    model = SketchToFace(tiny, random_banks(32)).eval()
    sketches = random_sketches(2, 192)
    with torch.no_grad():
        face = model(sketches, refine={"nose": 0.5, "remainder": 0.0}, gender="male")
        assert face.shape == (2, 3, 192, 192) and face.abs().max() <= 1
        # the same sketch as [1, 1, R, R] uint8, as [R, R] and as normalised floats
        one = model(sketches[:1, None], refine={"nose": 0.5, "remainder": 0.0}, gender="male")
        assert torch.allclose(one, face[:1], atol=1e-5)
        assert torch.equal(model(sketches[0]), model(normalize_sketch(sketches[:1])))
        # refine 0 is the raw path: the same as a model without banks
        raw = model(sketches, refine=0.0)
        bankless = SketchToFace(tiny)
        bankless.load_state_dict(model.state_dict())
        assert torch.equal(raw, bankless.eval()(sketches))
        assert not torch.equal(raw, model(sketches, refine=1.0))

    model.double()  # banks follow the module's moves and casts
    assert model.banks.get("nose", "male").dtype == torch.float64
    with torch.no_grad():
        assert model(sketches[:1]).dtype == torch.float64
    with pytest.raises(ValueError, match="unknown components eyes"):
        model(sketches, refine={"eyes": 1.0})
    with pytest.raises(ValueError, match=r"refine\['nose'\] must be"):
        model(sketches, refine={"nose": 2})
    with pytest.raises(ValueError, match="no gender 'other'"):
        model(sketches, gender="other")
    with pytest.raises(ValueError, match="normalised to"):
        model(sketches.float())
    with pytest.raises(ValueError, match=r"expected sketches shaped \[B, 1, 192, 192\]"):
        model(torch.zeros(1, 1, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="lack the component"):
        SketchToFace(tiny, FeatureBank({"nose": torch.zeros(3, 32)}))


def test_remainder_crop_is_whitened_at_the_four_windows(tiny):
    sketch = torch.full((1, 1, 192, 192), -1.0)
    crops = crop_sketch_components(sketch, tiny)
    windows = tiny.windows()
    painted = torch.zeros(192, 192, dtype=torch.bool)
    for name in ("left_eye", "right_eye", "nose", "mouth"):
        w = windows[name]
        painted[w.y:w.y + w.size, w.x:w.x + w.size] = True
        assert crops[name].shape == (1, 1, w.size, w.size) and crops[name].eq(-1).all()
    assert torch.equal(crops["remainder"][0, 0] == 1, painted)
    assert sketch.eq(-1).all()


# ---- configs and model folders ---------------------------------------------------------------------
def test_config_round_trips_and_refuses_bad_values():
    config = ModelConfig(**{**TINY, "encoder_slope": 1, "nose_fusion_rows": 40})
    assert config.encoder_slope == 1.0 and isinstance(config.encoder_slope, float)
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    bad = [
        ({"resolution": 4096}, "resolution=4096 is outside 64..2048"),
        ({"resolution": 500}, "multiple of 32"),
        ({"resolution": 64, "n_downsample": 6}, "keep at least 2x2 pixels"),  # 1x1: instance norm fails
        ({"latent_dim": 5000}, "latent_dim=5000 is outside"),
        ({"latent_dim": "512"}, "latent_dim must be an integer"),
        ({"ngf": 56.0}, "ngf must be an integer"),
        ({"n_blocks": True}, "n_blocks must be an integer"),
        ({"encoder_slope": float("inf")}, "finite number"),
        ({"projection": "pca"}, "projection must be one of anchored, gram"),
        ({"resolution": 2048, "latent_dim": 4096, "ce_base_channels": 32, "fm_base_channels": 32}, "parameters"),
        ({"colour": 3}, "unknown key colour"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message) as caught:
            ModelConfig.from_dict({**TINY, **change})
        assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="missing keys"):
        ModelConfig.from_dict({"resolution": 192}, complete=True)


def rewrite_checksums(folder: Path) -> None:
    """Make config.json name the folder's current files, as if they had been saved so."""
    document = json.loads((folder / CONFIG_FILE).read_text())
    for name, entry in document["files"].items():
        entry.update(bytes=(folder / name).stat().st_size, sha256=sha256_file(folder / name))
    (folder / CONFIG_FILE).write_text(json.dumps(document))


@pytest.fixture
def saved(tiny, tmp_path) -> tuple[SketchToFace, Path]:
    torch.manual_seed(3)
    model = SketchToFace(tiny, random_banks(32, seed=3))
    with torch.no_grad():
        model.train()(random_sketches(2, 192, seed=9))  # move the BatchNorm statistics off their defaults
    model.eval()
    save_pretrained(model, tmp_path / "model")
    return model, tmp_path / "model"


def test_save_and_load_give_the_same_outputs(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, BANKS_FILE])
    loaded = SketchToFace.from_pretrained(folder, device="cpu", precision="fp32")
    assert not loaded.training and loaded.config == model.config
    assert loaded.banks.counts() == model.banks.counts()
    # loading prepares the model for inference (batch norms folded into the convolutions)
    restored = loaded.state_dict()
    expected = prepare_for_inference(copy.deepcopy(model), torch.device("cpu"), "fp32").state_dict()
    assert restored.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(restored[key], value), key
    sketches = random_sketches(2, 192, seed=5)
    with torch.no_grad():
        for refine, gender in [(1.0, "female"), ({"mouth": 0.3}, "male"), (0.7, None)]:
            # equal up to float rounding: the loaded model convolves in channels-last layout,
            # with its batch norms folded into the convolutions
            torch.testing.assert_close(loaded(sketches, refine, gender), model(sketches, refine, gender),
                                       rtol=1e-4, atol=1e-4)
    assert all(p.requires_grad for p in loaded.parameters())
    # its folded weights no longer fit the architecture: saving it would write a folder that
    # cannot be loaded (over the good one, when saved in place)
    with pytest.raises(ValueError, match="rewritten for inference"):
        loaded.save_pretrained(folder)
    assert SketchToFace.from_pretrained(folder, device="cpu").banks is not None

    # bf16 (auto's choice on AMX CPUs and CUDA) computes the same faces to within its rounding
    in_bf16 = SketchToFace.from_pretrained(folder, device="cpu", precision="bf16")
    with torch.no_grad():
        face, reference = in_bf16(sketches), model(sketches)
    assert face.dtype == torch.float32 and (face - reference).abs().mean() < 0.01

    # saving again without banks removes the stale banks file, and loading gives no banks
    model.set_banks(None)
    model.save_pretrained(folder)
    assert not (folder / BANKS_FILE).exists()
    assert SketchToFace.from_pretrained(folder, "cpu").banks is None


def test_a_bad_config_is_refused_before_anything_is_built(saved, monkeypatch):
    _, folder = saved
    document = json.loads((folder / CONFIG_FILE).read_text())

    def no_building(*args, **kwargs):
        raise AssertionError("the model was built from a refused config")

    monkeypatch.setattr(SketchToFace, "__init__", no_building)
    for change, message in [({"resolution": 100_000}, "outside 64..2048"), ({"latent_dim": 10 ** 9}, "latent_dim"),
                            ({"wings": 2}, "unknown key wings")]:
        (folder / CONFIG_FILE).write_text(json.dumps({**document, "config": {**document["config"], **change}}))
        with pytest.raises(CheckpointError, match=message) as caught:
            SketchToFace.from_pretrained(folder, "cpu")
        assert "\n" not in str(caught.value)
    (folder / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        SketchToFace.from_pretrained(folder, "cpu")


def test_missing_files_and_mismatched_tensors_give_one_line_errors(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = saved
    with pytest.raises(ModelMissingError, match="model folder not found"):
        SketchToFace.from_pretrained(tmp_path / "nowhere", "cpu")
    (folder / BANKS_FILE).rename(tmp_path / "banks.bak")
    with pytest.raises(ModelMissingError, match="banks.safetensors: not found"):
        SketchToFace.from_pretrained(folder, "cpu")
    (tmp_path / "banks.bak").rename(folder / BANKS_FILE)

    state = load_file(folder / WEIGHTS_FILE)
    key = "generator.model.1.weight"
    cases = [
        ({**state, "extra.weight": torch.zeros(1)}, "1 unexpected tensor .*'extra.weight'"),
        ({k: v for k, v in state.items() if k != key}, f"missing 1 tensor .*'{key}'"),
        ({**state, key: torch.zeros(8, 8, 3, 3)}, rf"{key} has shape \[8, 8, 3, 3\], the config needs \[8, 8, 7, 7\]"),
        ({**state, key: state[key].double()}, f"{key} is F64, expected F32"),
        ({**state, key: torch.full_like(state[key], float("nan"))}, "NaN"),
        *(({**state, key: state[key].flatten().index_fill(0, torch.tensor([5]), bad).view_as(state[key])},
           f"{key} contains NaN or infinite values") for bad in (float("nan"), float("-inf"))),
    ]
    original = (folder / WEIGHTS_FILE).read_bytes()
    for tensors, message in cases:
        save_file(tensors, folder / WEIGHTS_FILE)
        with pytest.raises(CheckpointError, match="differ from what config.json records"):
            SketchToFace.from_pretrained(folder, "cpu")  # the file no longer matches the saved checksum
        rewrite_checksums(folder)
        with pytest.raises(CheckpointError, match=message) as caught:
            SketchToFace.from_pretrained(folder, "cpu")
        assert "\n" not in str(caught.value)
        (folder / WEIGHTS_FILE).write_bytes(original)
        rewrite_checksums(folder)
    SketchToFace.from_pretrained(folder, "cpu")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(ModelMissingError, match="model.safetensors: not found"):
        SketchToFace.from_pretrained(folder, "cpu")


class _Payload:
    """Unpickling this runs code that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("planted", [WEIGHTS_FILE, BANKS_FILE])
def test_a_planted_pickle_is_refused_and_never_run(saved, tmp_path, planted):
    _, folder = saved
    live = tmp_path / "payload-works"
    pickle.loads(pickle.dumps(_Payload(live)))
    assert live.exists(), "the payload must really run code when unpickled"

    marker = tmp_path / "pickle-was-run"
    (folder / planted).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="differ from what config.json records"):
        SketchToFace.from_pretrained(folder, "cpu")
    rewrite_checksums(folder)  # now only the safetensors reader stands between the file and us
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as caught:
        SketchToFace.from_pretrained(folder, "cpu")
    assert "\n" not in str(caught.value)
    assert not marker.exists()


def _use_copy(monkeypatch, kind: str) -> str:
    """Every large CPU bank gets the `kind` of copy, whichever this CPU would get."""
    from dfd_model import projection

    if kind == "int8" and not int8_product_runs():
        pytest.skip("the int8 copy needs torch's fbgemm int8 product (x86 builds), and this torch lacks it")
    monkeypatch.setattr(projection, "_copy_kind",
                        lambda bank: kind if bank.shape[0] > projection.LOW_PRECISION_ROWS else None)
    return kind


@pytest.fixture(params=["bf16", "int8"])
def scoring_copy(request, monkeypatch) -> str:
    """Both copies must give exact searches on any machine that can run them."""
    return _use_copy(monkeypatch, request.param)


def test_a_cpu_gets_the_copy_it_scores_fastest():
    """Large CPU banks get a copy (int8 where fbgemm's product runs and the CPU lacks native
    bf16, bf16 with it); small banks get none. Wherever torch has fbgemm, its product must pass
    the check int8_product_runs makes (else every such CPU would quietly lose the int8 copy)."""
    from dfd_data.devices import native_bf16
    from dfd_model.projection import _copy_kind, nearest

    large, small = torch.zeros(LOW_PRECISION_ROWS + 1, 100), torch.zeros(LOW_PRECISION_ROWS, 100)
    assert _copy_kind(small) is None
    assert int8_product_runs() == ("fbgemm" in torch.backends.quantized.supported_engines)
    assert _copy_kind(large) == ("int8" if int8_product_runs() and not native_bf16(torch.device("cpu")) else "bf16")
    # the input's range has columns of its own: a bank one value wide gets the copy too, and is searched exactly
    narrow = torch.randn(LOW_PRECISION_ROWS + 1, 1, generator=torch.Generator().manual_seed(0))
    assert _copy_kind(narrow) == _copy_kind(large)
    queries = torch.tensor([[0.0], [0.25], [-1.7], [3e-30]])
    found = nearest(queries, narrow, 3)[1]
    assert torch.equal(found, (narrow.double().T - queries.double()).abs().sort(dim=1, stable=True).indices[:, :3])
    too_wide = torch.zeros(1, MAX_WIDTH + 1).expand(LOW_PRECISION_ROWS + 1, -1)  # (its sums could pass int32's range)
    assert _copy_kind(too_wide) == "bf16"


def test_low_precision_scoring_finds_the_exact_neighbours_in_a_bank_of_tight_clusters(scoring_copy):
    """Faces come in look-alikes: a bank of tight clusters puts many rows within bf16's rounding
    of one another. The search must still return exactly the k nearest (a fixed margin of
    extra candidates once missed neighbours ranked 72nd by the bf16 scores)."""
    from dfd_model.projection import nearest

    generator = torch.Generator().manual_seed(5)
    centres = torch.randn(300, 512, generator=generator)
    bank = centres[torch.randint(0, 300, (17_703,), generator=generator)] + 0.1 * torch.randn(17_703, 512,
                                                                                             generator=generator)
    index = FeatureBank({"nose": bank}).index("nose")
    assert index.copy_scoring(1) == scoring_copy
    for row in range(0, 17_703, 1_770):
        query = bank[row:row + 1] + 0.005 * torch.randn(1, 512, generator=generator)
        distances, indices = nearest(query, bank, 10, index)
        assert torch.equal(indices, _exact_nearest(query, bank, 10)), row


def _exact_nearest(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """The k nearest rows of each query by float64 differences (torch.cdist's products are not
    exact), ties to the lower row."""
    rows = bank.double()
    squared = torch.stack([((rows - query) ** 2).sum(1) for query in queries.double()])
    return torch.from_numpy(np.argsort(squared.numpy(), axis=1, kind="stable")[:, :k])


@pytest.mark.parametrize("scale", [1e-21, 1e-24])
def test_searches_stay_exact_where_products_underflow(scoring_copy, scale):
    """Latents around 1e-21 make float32 and bf16 products subnormal, where rounding is no
    longer relative: the bound's floor must cover it (the int8 copy's scores had erred by 9.5
    times the bound, and at 1e-22 four searches went wrong)."""
    from dfd_model.projection import nearest

    generator = torch.Generator().manual_seed(8)
    bank = torch.randn(LOW_PRECISION_ROWS * 2, 512, generator=generator) * scale
    queries = bank[:4] + 0.3 * scale * torch.randn(4, 512, generator=generator)
    index = SearchIndex.of(bank)
    exact = (bank.double() ** 2).sum(1)[None] - 2 * queries.double() @ bank.double().T
    error = (index.scores(queries, bank).double() - exact).abs()
    targets = queries.double()
    bounds = index.error_bound(targets.norm(dim=1).numpy(), targets.abs().amax(1).numpy())
    assert (error <= torch.from_numpy(bounds)[:, None]).all()
    for row in range(4):
        assert torch.equal(nearest(queries[row:row + 1], bank, 10, index)[1], _exact_nearest(queries[row:row + 1],
                                                                                             bank, 10))


def test_scores_that_overflow_when_scored_again_leave_the_choice_to_float64(scoring_copy):
    """A query of 1.7e19 puts the products of two rows' scores past float32's range when the
    candidates are scored again: numpy's 2 * q.b is -inf for the farther row, which must not
    then pass for the nearest (it did, from either copy)."""
    from dfd_model.projection import nearest

    length = 1.7014e19
    bank = torch.zeros(LOW_PRECISION_ROWS + 52, 16)
    bank[:, 0], bank[:, 2] = -1e19, torch.linspace(0, 1e18, len(bank))  # far rows
    bank[5, 0] = 1.7013e38 / length  # the nearest
    bank[9, 0], bank[9, 1] = 1.7015e38 / length, 8.7e17  # farther, with q.b just past 2^127
    query = torch.zeros(1, 16)
    query[0, 0] = length
    assert nearest(query, bank, 1, SearchIndex.of(bank))[1].tolist() == [[5]]


def _score_errors(bank: torch.Tensor, query: torch.Tensor) -> tuple[np.ndarray, float, SearchIndex]:
    """(every row's score error, the bound, the index) for one query."""
    index = SearchIndex.of(bank)
    exact = (bank.double() ** 2).sum(1) - 2 * bank.double() @ query[0].double()
    error = np.abs(index.scores(query, bank)[0].numpy() - exact.numpy())
    target = query.double()
    return error, float(index.error_bound(target.norm(dim=1).numpy(), target.abs().amax(1).numpy())[0]), index


def test_the_score_error_bound_holds_where_bf16_rounding_errs_the_most(monkeypatch):
    """The search is exact only if no score errs by more than its bound. Here every rounding
    of a bf16 score errs the same way: q and b lose 0.99 of a unit roundoff towards 1 in each
    entry, and their float32 sum, 514, is a tie that bf16 rounds down to 512. The score then
    errs by 11.9, more than a bound without the product's final rounding allows (8.3)."""
    _use_copy(monkeypatch, "bf16")
    near_one = 1 + 0.99 * 2.0 ** -8
    row = torch.full((512,), near_one)
    row[0] = 3.0
    error, bound, index = _score_errors(row.repeat(LOW_PRECISION_ROWS + 1, 1), torch.full((1, 512), near_one))
    assert index.rows_bf16 is not None
    assert error.min() > 11.8 and (error <= bound).all()


def test_the_score_error_bound_holds_where_int8_rounding_errs_the_most(monkeypatch):
    """The int8 copy's error is largest where every value loses the same fraction of a step
    and the query points along that loss. Each row here is 127/64 (the peak: a scale of exactly
    1/64) then 511 values of 20.49/64, each stored as 20/64; the query is all ones. The score
    errs by 7.2: more than a bound without the copy's residual allows (2.7)."""
    _use_copy(monkeypatch, "int8")
    row = torch.full((512,), 20.49 / 64)
    row[0] = 127 / 64
    query = torch.ones(1, 512)
    error, bound, index = _score_errors(row.repeat(LOW_PRECISION_ROWS + 1, 1), query)
    stored = index.rows_int8.unpacked()[0]
    assert torch.equal(stored[0, 1:], torch.full((511,), 20, dtype=torch.int8))
    residual_term = 2 * 1.01 * float(query.norm()) * float((row - stored[0].float() / 64).norm())
    assert error.min() > 7.1 and (error <= bound).all() and bound - residual_term < 2.8

@pytest.mark.parametrize("scale", [1e-40, 1e-30, 1e-3, 1.0, 1e4, 1e30])
def test_int8_scores_stay_within_their_bound_at_every_query_scale(monkeypatch, scale):
    """The int8 product takes each query scaled by a power of two into its input range: tiny
    queries (1e-40 is below the scaling's limit), huge ones, and queries whose values fill the
    range to its edge (+-63 after scaling) must all be scored within the bound."""
    _use_copy(monkeypatch, "int8")
    generator = torch.Generator().manual_seed(11)
    bank = torch.randn(LOW_PRECISION_ROWS + 1, 64, generator=generator)
    queries = torch.randn(3, 64, generator=generator, dtype=torch.float64)
    queries[1] = torch.tensor([7.85, -7.85]).repeat(32)  # (scaled by 8 to +-62.8: every whole value at +-63)
    queries = (queries * scale).float()
    index = SearchIndex.of(bank)
    assert index.copy_scoring(3) == "int8"
    targets = queries.double()
    exact = (bank.double() ** 2).sum(1)[None] - 2 * targets @ bank.double().T
    error = (index.scores(queries, bank).double() - exact).abs()
    bounds = torch.from_numpy(index.error_bound(targets.norm(dim=1).numpy(), targets.abs().amax(1).numpy()))
    assert (error <= bounds[:, None]).all()


def test_the_score_error_bound_holds_where_the_int8_query_grid_errs_the_most(monkeypatch):
    """The int8 product holds a query to 1/128 of its grid's step. Here that error is largest in
    every value and points along the row: each scaled value's remainder is a rounding tie
    (2j + 0.5 sixty-fourths, rounded to 2j), and the row's signs follow the query's. The rows
    are integers with a peak of 127, which the copy holds exactly, so the bound's query term
    alone must cover the error (0.77 of the bound; dropping the remainder row errs by 20 times
    the bound, a range that moves the grid by 10). Remainders just below a rounding step
    (j + 0.97 sixty-fourths) must round to the nearest step, not down (which errs by 1.5 times
    the bound)."""
    _use_copy(monkeypatch, "int8")
    generator = torch.Generator().manual_seed(0)
    signs = torch.where(torch.rand(64, generator=generator) < 0.5, -1.0, 1.0).double()
    scaled = torch.randint(0, 31, (64,), generator=generator).double() + (
        2 * torch.randint(0, 16, (64,), generator=generator).double() + 0.5) / 64
    scaled[0] = 31.5  # (the peak: the query is scaled by exactly 8)
    query = (signs * scaled / 8)[None].float()
    bank = torch.randint(-127, 128, (LOW_PRECISION_ROWS + 1, 64), generator=generator).float()
    bank[:, 0], bank[0] = 127, 127 * signs.float()
    error, bound, index = _score_errors(bank, query)
    assert index.rows_int8 is not None
    assert error[0] > 0.7 * bound and (error <= bound).all()
    scaled = torch.randint(0, 31, (64,), generator=generator).double() + (
        torch.randint(0, 31, (64,), generator=generator).double() + 0.97) / 64
    scaled[0] = 31.5
    error, bound, _ = _score_errors(bank, (signs * scaled / 8)[None].float())
    assert (error <= bound).all()


def test_int8_scores_of_a_large_batch_are_those_of_its_queries_one_by_one(monkeypatch):
    """The int8 product takes 256 queries a call: a batch of 600 at scales from 1e-3 to 1e3
    must score as each query does alone (the same float32 values) and within the bound."""
    _use_copy(monkeypatch, "int8")
    generator = torch.Generator().manual_seed(4)
    bank = torch.randn(LOW_PRECISION_ROWS + 1, 32, generator=generator)
    scales = 10.0 ** (6 * torch.rand(600, 1, generator=generator) - 3)
    queries = torch.randn(600, 32, generator=generator) * scales
    index = SearchIndex.of(bank)
    together = index.scores(queries, bank)
    assert torch.equal(together, torch.cat([index.scores(query[None], bank) for query in queries]))
    targets = queries.double()
    exact = (bank.double() ** 2).sum(1)[None] - 2 * targets @ bank.double().T
    bounds = torch.from_numpy(index.error_bound(targets.norm(dim=1).numpy(), targets.abs().amax(1).numpy()))
    assert ((together.double() - exact).abs() <= bounds[:, None]).all()


def test_an_int8_product_that_computes_otherwise_is_refused(monkeypatch):
    """int8_product_runs checks that fbgemm's product computes exactly what the bound assumes.
    A range that makes its step 128/127 instead of 1 (so every input is quantised off the
    grid) must fail the check, and banks then get the bf16 copy."""
    from dfd_data.devices import native_bf16
    from dfd_model import int8_scores, projection
    from dfd_model.projection import _copy_kind

    if not int8_product_runs():
        pytest.skip("this torch has no fbgemm int8 product to check")
    bank = torch.randn(LOW_PRECISION_ROWS + 1, 64)
    int8_product_runs.cache_clear()
    monkeypatch.setattr(int8_scores, "_RANGE_ROW", (-63.0, 65.0))
    try:
        assert not int8_product_runs()
        if not native_bf16(torch.device("cpu")):
            assert _copy_kind(bank) == "bf16"
            monkeypatch.setattr(projection, "int8_product_runs", lambda: True)  # (the bank's own check must refuse it too)
            index = SearchIndex.of(bank)
            assert index.rows_int8 is None and index.rows_bf16 is not None
    finally:
        int8_product_runs.cache_clear()  # (the next call checks the real product again)


def test_the_per_bank_check_reads_every_row():
    """The check made as a bank's int8 copy is packed compares the products of every row, not
    a sample: two rows swapped in the packed copy past the first 8,192 (a chunk of the check)
    must be caught, and so must a single value one step off."""
    from dfd_model.int8_scores import PackedRows, _computes_as_said

    if not int8_product_runs():
        pytest.skip("this torch has no fbgemm int8 product to check")
    generator = torch.Generator().manual_seed(6)
    integers = torch.randint(-127, 128, (9000, 48), generator=generator, dtype=torch.int8)
    scales = torch.rand(9000, generator=generator) + 0.01
    assert _computes_as_said(PackedRows(integers, scales), integers, scales)
    swapped = integers.clone()
    swapped[[8500, 8501]] = swapped[[8501, 8500]]
    assert not _computes_as_said(PackedRows(swapped, scales), integers, scales)
    stepped = integers.clone()
    stepped[8999, 47] = stepped[8999, 47] + (1 if stepped[8999, 47] < 127 else -1)
    assert not _computes_as_said(PackedRows(stepped, scales), integers, scales)


def test_the_int8_copy_is_kept_under_autocast(monkeypatch):
    """A bank first searched inside a CPU autocast region still gets its int8 copy: the check's
    exact sums are numpy's (a torch float32 product there had run in bf16, refused the bank and,
    cached, turned the copy off for the whole process)."""
    _use_copy(monkeypatch, "int8")
    int8_product_runs.cache_clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert int8_product_runs()
            index = SearchIndex.of(torch.randn(LOW_PRECISION_ROWS + 1, 64))
        assert index.rows_int8 is not None
    finally:
        int8_product_runs.cache_clear()

def test_a_copied_int8_index_is_packed_for_fbgemm_again(monkeypatch):
    """A deep copy or a pickle of an index packs its int8 rows again, for fbgemm whatever the
    current engine: packed for QNNPACK, whose product quantises the query off the grid, the
    copy had erred by 2.9 times its bound and returned a wrong neighbour."""
    _use_copy(monkeypatch, "int8")
    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch has no QNNPACK engine to copy under")
    generator = torch.Generator().manual_seed(2)
    bank = torch.randn(LOW_PRECISION_ROWS + 1, 64, generator=generator)
    queries = torch.randn(3, 64, generator=generator) * 5
    index = SearchIndex.of(bank)
    engine = torch.backends.quantized.engine
    torch.backends.quantized.engine = "qnnpack"
    try:
        copies = [copy.deepcopy(index), pickle.loads(pickle.dumps(index))]
    finally:
        torch.backends.quantized.engine = engine
    for copied in copies:
        assert torch.equal(copied.scores(queries, copied.source), index.scores(queries, bank))


def test_packing_from_several_threads_leaves_the_engine_as_it_was():
    """Packing switches the process's quantized engine to fbgemm for a moment; threads packing
    at once must not leave it switched (they did in 8-12 of 20 trials without a lock)."""
    from concurrent.futures import ThreadPoolExecutor

    from dfd_model.int8_scores import pack_rows

    if not int8_product_runs():
        pytest.skip("this torch has no fbgemm int8 product")
    engine = torch.backends.quantized.engine
    banks = [torch.randn(64, 32) for _ in range(8)]
    for _ in range(5):
        with ThreadPoolExecutor(4) as pool:
            assert all(packed is not None for packed, _ in pool.map(pack_rows, banks))
        assert torch.backends.quantized.engine == engine


def test_large_banks_are_searched_by_matrix_product_and_reranked_exactly(scoring_copy):
    """Banks above LOW_PRECISION_ROWS are scored from a low-precision copy (many queries at once
    in float32 on CPUs that emulate bf16); the search must find the same neighbours as an
    exhaustive exact search, and a bank vector must still project onto itself exactly."""
    from dfd_model.projection import nearest

    generator = torch.Generator().manual_seed(3)
    bank = torch.randn(LOW_PRECISION_ROWS * 2, 64, generator=generator)
    banks = FeatureBank({"nose": bank})
    for count in (4, 20):  # (4 from either copy; 20 from the int8 copy, or the bank itself where bf16 is emulated)
        queries = bank[:count] + 0.2 * torch.randn(count, 64, generator=generator)
        distances, indices = nearest(queries, bank, 10, banks.index("nose"))
        expected = _exact_nearest(queries, bank, 10)
        assert torch.equal(indices, expected)
        assert torch.allclose(distances.double(), (queries.double()[:, None] - bank.double()[expected]).norm(dim=2))
    projected, own, weights = project(bank[7:8], bank, 10, index=banks.index("nose"))
    assert own[0, 0] == 7 and torch.equal(projected, bank[7:8]) and weights[0, 0] == 1

    # one query at a time, and batches the copy scores, at the released bank size and latent width
    bank = torch.randn(17_703, 512, generator=generator)
    index = FeatureBank({"nose": bank}).index("nose")
    for row in range(0, 17_703, 3_001):
        query = bank[row:row + 1] + 0.5 * torch.randn(1, 512, generator=generator)
        assert torch.equal(nearest(query, bank, 10, index)[1], _exact_nearest(query, bank, 10))
    queries = bank[:16] + 0.5 * torch.randn(16, 512, generator=generator)
    assert torch.equal(nearest(queries, bank, 10, index)[1], _exact_nearest(queries, bank, 10))


def _several_searches(device: str) -> list[tuple[torch.Tensor, torch.Tensor, SearchIndex | None]]:
    """Batches of queries against banks of every kind project_many meets: a bank scored from a
    low-precision copy (on a CPU), a small float32 one with its index, one searched without an
    index, a float64 one, and one with fewer rows than k (every row a neighbour)."""
    generator = torch.Generator().manual_seed(5)
    banks = [torch.randn(LOW_PRECISION_ROWS + 500, 512, generator=generator), torch.randn(300, 512, generator=generator),
             torch.randn(300, 512, generator=generator), torch.randn(200, 512, generator=generator).double(),
             torch.randn(6, 512, generator=generator)]
    requests = []
    for number, bank in enumerate(banks):
        bank = bank.to(device)
        noise = torch.randn(8, 512, generator=generator, dtype=bank.dtype).to(device)
        query = bank[torch.arange(8) % len(bank)] + 0.3 * noise
        requests.append((query, bank, None if number == 2 else SearchIndex.of(bank)))
    return requests


def test_projecting_several_banks_at_once_gives_each_banks_own_projection():
    from dfd_model.projection import project_many

    requests = _several_searches("cpu")
    together = project_many(requests, k=10)
    assert len(together) == len(requests) and project_many([], k=10) == []
    for (query, bank, index), results in zip(requests, together):
        alone = project(query, bank, 10, index=index)
        for mine, expected in zip(results, alone):
            assert mine.dtype == expected.dtype and torch.equal(mine, expected)
        assert results[1].shape == (8, min(10, bank.shape[0]))
        exact = torch.cdist(query.double(), bank.double())
        assert torch.equal(results[1], torch.topk(exact, min(10, bank.shape[0]), largest=False)[1])
        for method in ("anchored", "gram"):  # a batch is solved as its queries are one by one
            batched = project(query, bank, 10, method=method, index=index)
            for row in range(query.shape[0]):
                single = project(query[row:row + 1], bank, 10, method=method, index=index)
                assert torch.equal(single[1], batched[1][row:row + 1])
                assert torch.allclose(single[0], batched[0][row:row + 1], atol=1e-6)
                assert torch.allclose(single[2], batched[2][row:row + 1], atol=1e-9)
    for bank, index in (requests[1][1:], requests[0][1:]):  # (a bank searched directly, and one scored from a copy)
        with pytest.raises(ValueError, match="query contains NaN"):
            project_many([requests[1], (torch.full((1, 512), float("nan")), bank, index)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: the GPU search path runs only there")
def test_searches_on_a_gpu_find_the_neighbours_a_cpu_finds(monkeypatch):
    """On a GPU, batches of DEVICE_MIN_QUERIES or more are projected there: the neighbours must
    be the CPU's, exactly, and the projections equal to float rounding."""
    from dfd_model import projection_on_device
    from dfd_model.projection import DEVICE_MIN_QUERIES, project_many

    assert DEVICE_MIN_QUERIES <= 8  # (the batches of _several_searches)
    on_cpu, on_gpu = _several_searches("cpu"), _several_searches("cuda")
    computed, compute = [], projection_on_device.project_on_device
    monkeypatch.setattr(projection_on_device, "project_on_device",
                        lambda *args: computed.append(args[1]) or compute(*args))
    for cpu, gpu in zip(project_many(on_cpu), project_many(on_gpu)):
        assert all(tensor.device.type == "cuda" for tensor in gpu)
        assert torch.equal(gpu[1].cpu(), cpu[1])
        assert torch.allclose(gpu[0].cpu(), cpu[0], atol=1e-5) and torch.allclose(gpu[2].cpu(), cpu[2], atol=1e-5)
    assert len(computed) == len(on_gpu) and all(bank.is_cuda for bank in computed)
    bank, index = on_gpu[0][1], on_gpu[0][2]
    projected, rows, weights = project_many([(bank[:8], bank, index)])[0]
    assert torch.equal(rows[:, 0].cpu(), torch.arange(8)) and torch.equal(projected, bank[:8])
    assert torch.equal(weights[:, 0].cpu(), torch.ones(8))


def test_the_device_projection_matches_the_hosts_and_distrusts_what_it_cannot_settle(monkeypatch):
    """projection_on_device runs on any device: here on the CPU, against the host's numpy way."""
    from dfd_model import projection
    from dfd_model.projection_on_device import DEVICE_CANDIDATES, project_on_device

    for method in ("anchored", "gram"):
        for query, bank, index in _several_searches("cpu"):
            *ours, trusted = project_on_device(query, bank, 10, 1e-3, method, index)
            expected = project(query, bank, 10, method=method, index=index)
            assert trusted.item() and torch.equal(ours[1], expected[1])
            for mine, theirs in ((ours[0], expected[0]), (ours[2], expected[2])):
                assert mine.dtype == theirs.dtype and torch.allclose(mine, theirs, atol=1e-6)

    # k above DEVICE_CANDIDATES: it keeps that many more
    generator = torch.Generator().manual_seed(9)
    bank = torch.randn(1000, 64, generator=generator)
    *ours, trusted = project_on_device(bank[:2] + 0.1, bank, 200, 1e-3, "anchored", None)
    assert trusted.item() and torch.equal(ours[1], project(bank[:2] + 0.1, bank, 200)[1])

    # More rows than it keeps lie within the error bound (copies of one row), or the query is
    # not finite: not trusted, and project_many searches it again the host's way.
    generator = torch.Generator().manual_seed(9)
    bank = torch.cat([torch.randn(1, 16, generator=generator).repeat(DEVICE_CANDIDATES + 20, 1),
                      torch.randn(100, 16, generator=generator)])
    query = bank[:1] + 1e-3
    assert not project_on_device(query, bank, 10, 1e-3, "anchored", None)[3].item()
    assert not project_on_device(torch.full((1, 16), float("nan")), bank, 10, 1e-3, "anchored", None)[3].item()
    monkeypatch.setattr(projection, "_computed_on_device", lambda query, bank: True)
    searched_on_host, search_all = [], projection._search_all
    monkeypatch.setattr(projection, "_search_all",
                        lambda requests, k: searched_on_host.extend(requests) or search_all(requests, k))
    projected, indices, weights = projection.project_many([(query, bank, None), (bank[-1:], bank, None)])[0]
    assert [request[0] for request in searched_on_host] == [query]  # the settled one is not searched again
    assert torch.equal(indices, torch.arange(10)[None])  # the copies, lowest rows first, as the host finds them
    assert torch.allclose(projected, bank[:1]) and torch.allclose(weights.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="query contains NaN"):
        projection.project_many([(torch.full((1, 16), float("nan")), bank, None)])
    with pytest.raises(ValueError, match="built from another tensor"):
        projection.project_many([(query, bank, SearchIndex.of(bank.clone()))])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # (the huge query's distances, in float32)
def test_searches_hold_under_reduced_precision_settings_and_overflowing_products():
    """The scores' error bound assumes float32 products: autocast and the fp32_precision
    settings (TF32, bf16 passes) must not reach them, and are left as they were. A query whose
    float32 products overflow (NaN scores) is searched over every row, not given another's
    neighbours."""
    from dfd_model.projection import nearest

    generator = torch.Generator().manual_seed(4)
    bank = torch.randn(1_500, 512, generator=generator)
    queries = bank[:16] + 0.05 * torch.randn(16, 512, generator=generator)
    exact = torch.topk(torch.cdist(queries.double(), bank.double()), 10, largest=False)[1]
    setting = torch.backends.mkldnn.matmul
    before, setting.fp32_precision = setting.fp32_precision, "bf16"
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(nearest(queries, bank, 10)[1], exact)
        assert setting.fp32_precision == "bf16" and not torch.is_autocast_enabled("cpu")
    finally:
        setting.fp32_precision = before

    small = torch.rand(20, 2, generator=generator) + 2
    small[:, 1] *= -1
    huge = torch.tensor([[0.5, 0.5], [3e38, 3e38], [0.1, 0.2]])
    indices = nearest(huge, small, 3)[1]
    assert indices[1].tolist() == [0, 1, 2]  # every distance ties in float64: the lowest rows
    assert torch.equal(indices[[0, 2]], torch.topk(torch.cdist(huge[[0, 2]].double(), small.double()), 3,
                                                   largest=False)[1])
