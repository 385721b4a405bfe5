"""Our float32 error against the float64 peer, compared with the peer's own float32 error.

Issue 16's rule: our error at most 1.5x the peer's. Both the worst position and the root-mean-square error over the
real positions are held to it (the RMS is the stable statistic; one max over thousands of rounding errors moves with
XLA:CPU's and torch's different exp/tanh approximations and summation orders). A real defect (a wrong scale, a mask
leak, a transposed weight) gives errors of order one, thousands of times these bounds."""
import numpy as np


def float32_errors(ours, peer32, peer64, real):
    """(ours, peer) as {'max': ..., 'rms': ...} over the positions where `real` (broadcastable) is true."""
    real = np.broadcast_to(real, np.shape(peer64))

    def stats(x):
        diff = np.abs(np.asarray(x, np.float64) - peer64)[real]
        return {"max": float(diff.max()), "rms": float(np.sqrt(np.mean(diff ** 2)))}

    return stats(ours), stats(peer32)


def assert_float32_error_like_peer(ours, peer32, peer64, real, rms_factor=1.5, max_factor=1.5):
    mine, peer = float32_errors(ours, peer32, peer64, real)
    assert peer["max"] > 0, "the peer's float32 run equals its float64 run: the comparison measures nothing"
    assert mine["rms"] <= rms_factor * peer["rms"] and mine["max"] <= max_factor * peer["max"], (mine, peer)
    return mine, peer
