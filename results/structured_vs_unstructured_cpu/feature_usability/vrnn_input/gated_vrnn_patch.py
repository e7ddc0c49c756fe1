"""Pilot (throwaway): the VRNN consumes the intensity-gated keypoints. Patch, then run a script or the CLI."""
import runpy, sys
from kp_rl import keypoints as K
_features = K.KeypointAutoencoder.features
K.KeypointAutoencoder.features = lambda self, frames: K.gate_by_intensity(_features(self, frames))
K.KeypointAutoencoder.observed = lambda self, features: features
target = sys.argv[1]; sys.argv = sys.argv[1:]
if target == "kp-rl":
    from kp_rl.cli import main; sys.exit(main())
runpy.run_path(target, run_name="__main__")
