"""Pilot (throwaway): the keypoint autoencoder reconstructs each sequence from the reference frame of *another*
sequence of the batch (the batch rolled by one), not from its own first frame. What stays still through an
episode but differs between episodes (reacher's target) can then no longer be copied from the reference: a
keypoint has to carry it. Patch, then run the CLI: python other_episode_patch.py kp-rl train keypoints ..."""
import sys

from kp_rl import keypoints as K


def forward(self, frames):
    frames = self._frames(frames, min_dim=5)
    code = self.encode(frames)
    first_features = self._flat(code, step=0)
    if frames.shape[0] > 1:  # the reference (frame 0 and its code) of the next sequence in the batch
        return self.decode_features(self._flat(code), frames[:, 0].roll(1, 0), first_features.roll(1, 0)), code
    return self.decode_features(self._flat(code), frames[:, 0], first_features), code


K._FrameAutoencoder.forward = forward
sys.argv = sys.argv[1:]
from kp_rl.cli import main  # noqa: E402

sys.exit(main())
