"""The GPU check's code path on CPU: export the packed rows, then time the tiny T5 and tiny decoder from the .npz."""
import numpy as np
import pytest

from scripts.bench import _gpu_check, _train_decoder


@pytest.mark.slow
def test_export_then_smoke_run_gives_rows_for_both_families(tmp_path):
    assert _gpu_check.main(['--export', str(tmp_path)]) == 0
    decoder_rows = _train_decoder.load_gpu_rows(str(tmp_path))
    assert decoder_rows['decoder_input_tokens'].shape == (_train_decoder.GPU_NPZ_ROWS, 1280)
    assert decoder_rows['decoder_segment_ids'].max() > 1          # packed: several examples per row
    assert np.all(decoder_rows['decoder_loss_weights'] <= (decoder_rows['decoder_segment_ids'] > 0))
    results = {r['name']: r for r in _gpu_check.run(str(tmp_path), smoke=True)}
    for prefix in ('t5_tiny_gpu_bf16_b2_1024_256', 'tiny_decoder_gpu_bf16_b2_prefix_lm_1280'):
        assert results[f'{prefix}_s_per_step']['ours'] > 0
        assert 0 < results[f'{prefix}_useful_mfu']['ours'] <= results[f'{prefix}_mfu']['ours']


def test_an_older_export_without_decoder_rows_loads_as_none(tmp_path):
    np.savez(tmp_path / 'packed_1024_256.npz', encoder_input_tokens=np.ones((2, 4), np.int32))
    assert _train_decoder.load_gpu_rows(str(tmp_path)) is None   # run() then skips the decoder with a message
