"""The smallest BLS model: a toy denoising loop that calls the `unet` model once per step.

Only the mechanics of the real pipeline (pipelines/stable_diffusion.py, which adds the scheduler,
classifier-free guidance and the other networks): read the inputs, refuse a bad request, call a
model by BLS and check its answer, return the result.
"""
import numpy as np
import triton_python_backend_utils as pb_utils


def error(message, code):  # pb_utils is filled in after this file is imported: no default here
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def execute(self, requests):  # one response per request: a bad one fails alone
        return [self.denoise(request) for request in requests]

    def denoise(self, request):
        sample = pb_utils.get_input_tensor_by_name(request, "sample").as_numpy()  # [B, 4, h, w]
        text = pb_utils.get_input_tensor_by_name(request, "encoder_hidden_states").as_numpy()
        steps = int(pb_utils.get_input_tensor_by_name(request, "num_inference_steps").as_numpy()[0])
        if not 1 <= steps <= 1000:
            return error(f"num_inference_steps={steps} is not allowed: send an integer in [1, 1000]",
                         pb_utils.TritonError.INVALID_ARG)
        for i in range(steps):
            timestep = np.full((len(sample), 1), 1000.0 * (1 - i / steps), np.float32)  # [B, 1] on the wire
            response = pb_utils.InferenceRequest(
                model_name="unet",
                requested_output_names=["outputs"],
                inputs=[pb_utils.Tensor("sample", sample), pb_utils.Tensor("timestep", timestep),
                        pb_utils.Tensor("encoder_hidden_states", text)],
            ).exec()
            if response.has_error():  # a sub-request's failure is this request's failure
                return error(f"model 'unet' failed: {response.error().message()}", pb_utils.TritonError.UNAVAILABLE)
            noise = pb_utils.get_output_tensor_by_name(response, "outputs").as_numpy()
            # A toy Euler step, not a real scheduler (those are in pipelines/stable_diffusion.py).
            sample = sample - noise / np.float32(steps)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("sample", sample)])
