"""The tiny training configuration the training tests share (tests/test_train.py, tests/test_device.py):
32x32 frames, 4 keypoints, a 16-unit VRNN, a few dozen steps with logs, evaluations and checkpoints along the way."""

TINY = dict(keypoints={"image_size": 32, "num_keypoints": 4, "base_filters": 4, "layers_per_scale": 0},
            cnn={"latent_dim": 12},
            dynamics={"rnn_units": 16, "latent_dim": 4, "prior_hidden": 16, "posterior_hidden": 16,
                      "decoder_hidden": 16, "reward_hidden": 16, "observed_steps": 4, "predicted_steps": 4,
                      "num_samples": 3},
            train={"steps": 30, "dynamics_steps": 30, "batch_size": 4, "dynamics_batch_size": 8,
                   "sequence_length": 4, "log_every": 5, "eval_every": 10, "checkpoint_every": 10,
                   "image_every": 15, "lr": 3e-3})
