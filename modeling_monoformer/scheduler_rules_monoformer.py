"""Which diffusers scheduler fits a MonoFormer model: the default one for its `prediction_type`.

One home for the rule that the conversion script (the `scheduler/` folder it saves) and the training scripts (a
checkpoint without a `scheduler/` folder) both apply. diffusers is imported inside the function, so importing this
module costs nothing.
"""

SCHEDULER_PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def default_noise_scheduler(prediction_type: str, num_train_timesteps: int = 1000, learn_sigma: bool = False):
    """The diffusers scheduler a model with this `prediction_type` trains and samples with by default.

    - `"flow"`: `FlowMatchEulerDiscreteScheduler(num_train_timesteps)` (rectified flow, `shift=1`);
    - `"epsilon"` / `"v_prediction"`: `DDPMScheduler` with linear betas, the same `prediction_type`, the variance the
      head learns or not (`"learned_range"` when `learn_sigma`, else `"fixed_small"`), no clipping of the `x0`
      estimate, and `timestep_spacing="trailing"` so that sampling starts at `t = T - 1` whatever the number of steps.

    Any scheduler built from its config (`DDIMScheduler.from_config(s.config)`, ...) keeps these choices.
    """
    if prediction_type not in SCHEDULER_PREDICTION_TYPES:
        raise ValueError(f"`prediction_type` must be one of {SCHEDULER_PREDICTION_TYPES}, got {prediction_type!r}.")
    if num_train_timesteps < 1:
        raise ValueError(f"`num_train_timesteps` must be >= 1, got {num_train_timesteps!r}.")
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if prediction_type == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps)
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        prediction_type=prediction_type,
        variance_type="learned_range" if learn_sigma else "fixed_small",
        clip_sample=False,
        timestep_spacing="trailing",
    )


__all__ = ["SCHEDULER_PREDICTION_TYPES", "default_noise_scheduler"]
