"""Peers' own test cases, ported to our API (their strings, shapes and assertions kept). Each test names the peer test
it comes from. They caught bugs that gave wrong results without an error (issue 10)."""

import pytest, torch
from effnet_fastai.blocks import decode_stage, encode_stage, spec_stride
from effnet_fastai.model import EfficientNet, num_params
from effnet_fastai.convert import convert_state_dict
from helpers import randomize_, rel_diff, TOL


def get_block_args():
    "MONAI tests/test_efficientnet.py::get_block_args, verbatim: the reference's strings, a stride digit per axis"
    return [
        "r1_k3_s11_e1_i32_o16_se0.25",
        "r2_k3_s22_e6_i16_o24_se0.25",
        "r2_k5_s22_e6_i24_o40_se0.25",
        "r3_k3_s22_e6_i40_o80_se0.25",
        "r3_k5_s11_e6_i80_o112_se0.25",
        "r4_k5_s22_e6_i112_o192_se0.25",
        "r1_k3_s11_e6_i192_o320_se0.25",
        "r1_k3_s11_e1_i32_o16_se0.25_noskip",
        "r2_k3_s22_e6_i16_o24_se0.25_noskip",
        "r2_k5_s22_e6_i24_o40_se0.25_noskip",
        "r3_k3_s22_e6_i40_o80_se0.25_noskip",
        "r3_k5_s11_e6_i80_o112_se0.25_noskip",
        "r4_k5_s22_e6_i112_o192_se0.25_noskip",
        "r1_k3_s11_e6_i192_o320_se0.25_noskip",
    ]


def test_block_args_decode():
    "MONAI tests/test_efficientnet.py::test_block_args_decode: strings -> specs -> the same strings"
    for s in get_block_args():
        assert encode_stage(decode_stage(s)) == s


def test_decoders_agree():
    "efficientnet-pytorch's `BlockDecoder` and MONAI's `BlockArgs.from_string` read every string as we do, in any rank"
    from efficientnet_pytorch.utils import BlockDecoder
    from monai.networks.nets.efficientnet import BlockArgs

    for s in get_block_args():
        ours, lm, mo = decode_stage(s), BlockDecoder._decode_block_string(s), BlockArgs.from_string(s)
        assert (
            ours.repeats,
            ours.kernel_size,
            ours.expand_ratio,
            ours.n_inp,
            ours.n_out,
            ours.se_ratio,
            ours.id_skip,
        ) == (
            mo.num_repeat,
            mo.kernel_size,
            mo.expand_ratio,
            mo.input_filters,
            mo.output_filters,
            mo.se_ratio,
            mo.id_skip,
        )
        assert lm.stride == [mo.stride]
        for nd in (1, 2, 3):
            assert spec_stride(ours.stride, nd) == (mo.stride,) * nd


@pytest.mark.parametrize("ndim,sz", [(2, 64), (3, 32)])
def test_reference_strings_build_monai_network(ndim, sz):
    """MONAI tests/test_efficientnet.py::test_shape for b0 with its own strings as `block_spec`: the network MONAI
    builds from them (parameters, converted weights, logits), not one with a stride of 22"""
    from monai.networks.nets import EfficientNetBN

    torch.manual_seed(0)
    x = torch.randn(2, 1, *(sz,) * ndim)
    peer = randomize_(
        EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=ndim, in_channels=1, num_classes=10), x
    )
    ours = EfficientNet(ni=1, num_classes=10, ndim=ndim, block_spec=get_block_args()[:7])
    assert ours.total_stride == (32,) * ndim and num_params(ours) == num_params(peer)
    ours.load_state_dict(convert_state_dict(peer.state_dict(), "monai", model=ours))
    assert rel_diff(peer, ours, x) < TOL
