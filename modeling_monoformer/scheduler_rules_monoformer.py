"""Which diffusers schedulers fit a MonoFormer model: the default one for its `prediction_type`, and the check that
refuses one that cannot train or sample it.

One home for rules that several sides apply: the conversion script (the `scheduler/` folder it saves), the training
scripts (a checkpoint without a `scheduler/` folder), the data collator and the pipeline. The pipeline imports this
module as a flat sibling, so `save_pretrained` ships it next to `pipeline_monoformer.py`: it imports no other sibling,
and diffusers only inside `default_noise_scheduler`.
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


def check_scheduler_matches(scheduler, prediction_type: str) -> None:
    """Raise a `ValueError` if a diffusers scheduler cannot sample a model with this `prediction_type`.

    Flow models need a flow-matching scheduler (`FlowMatch*`, or DPM-Solver with `use_flow_sigmas=True` and
    `prediction_type="flow_prediction"`); epsilon / v models a non-flow one whose `prediction_type` is the model's.
    The training collator (`add_training_noise`) and the pipeline (`check_inputs`) both apply it.
    """
    name = type(scheduler).__name__
    use_flow_sigmas = bool(getattr(scheduler.config, "use_flow_sigmas", False))
    is_flow = "FlowMatch" in name or use_flow_sigmas
    if prediction_type == "flow":
        if not is_flow:
            raise ValueError(
                f"`scheduler` {name} is not a flow-matching scheduler but the model's `prediction_type` is 'flow': use "
                "FlowMatchEulerDiscreteScheduler (or DPMSolverMultistepScheduler with use_flow_sigmas=True, "
                "prediction_type='flow_prediction')."
            )
        sched_pred = getattr(scheduler.config, "prediction_type", "flow_prediction")
        if use_flow_sigmas and sched_pred != "flow_prediction":
            raise ValueError(
                f"`scheduler.config.prediction_type` is {sched_pred!r} but the model predicts a flow velocity: "
                "build it with `prediction_type='flow_prediction'`."
            )
        return
    if is_flow:
        raise ValueError(
            f"`scheduler` {name} is a flow-matching scheduler but the model's `prediction_type` is "
            f"{prediction_type!r}: use DDPM, DDIM, DPM-Solver++ or Euler."
        )
    sched_pred = getattr(scheduler.config, "prediction_type", prediction_type)
    if sched_pred != prediction_type:
        raise ValueError(
            f"`scheduler.config.prediction_type` is {sched_pred!r} but the model predicts {prediction_type!r}: "
            f"build it with `Scheduler.from_config(pipe.scheduler.config, prediction_type={prediction_type!r})`."
        )


__all__ = ["SCHEDULER_PREDICTION_TYPES", "check_scheduler_matches", "default_noise_scheduler"]
