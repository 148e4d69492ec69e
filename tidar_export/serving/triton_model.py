"""TiDAR in Triton Inference Server: the decoupled Python-backend model (copied as model.py
into the model's version folder by `tidar-export triton`; it runs inside Triton's Python
backend stub, never in the toolkit).

Each model instance opens the serving engine (tidar_runtime.engine) once, over the artifact
beside this file; execute() parses every request and submits it to the engine, which admits
it into a free row of the artifact's batch between two batched passes, so concurrent requests
share the step. Responses go out from the engine's thread through each request's response
sender: with `stream` true one response per piece of text (the last one carries the finish
reason and the final flag), otherwise one response with the whole text. A request that is
cancelled (the client went away) is aborted and frees its row.

The runtime this repository was generated with sits beside this file (tidar_runtime/) and is
put first on sys.path, so the model needs only numpy (< 2 for this stub), tokenizers and the
backend's own library in Triton's Python.
"""

import json
import os
import sys
import uuid

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path[:1] != [HERE]:
    sys.path.insert(0, HERE)

from tidar_runtime.engine import FINISH_REASONS, QueueFull, open_engine  # noqa: E402 (after the path above)
from tidar_runtime.errors import FieldError, TiDARError  # noqa: E402
from tidar_runtime.request import GenerationRequest  # noqa: E402
from tidar_runtime.sampling import SamplingParams  # noqa: E402

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DEFAULT_MAX_TOKENS = 64
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "seed", "max_tokens", "stop", "stop_words")


def _scalar(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    a = t.as_numpy().reshape(-1)
    if a.size != 1:
        raise TiDARError(f"input {name} must hold one value, got {a.size}")
    v = a[0]
    return _text(v, name) if isinstance(v, bytes) else v.item()


def _strings(request, name):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return []
    return [_text(v, name) if isinstance(v, bytes) else str(v) for v in t.as_numpy().reshape(-1)]


def _text(raw, name):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TiDARError(f"input {name} is not valid UTF-8") from None


# the request model's field -> the name a client of this model knows it by (in error messages)
INPUT_NAMES = {"prompt": "text_input", "seed": "random_seed", "stop": "stop_words", "stop_tokens": "end_id"}


def parse_request(request):
    """The GenerationRequest of one Triton request: vLLM-style `sampling_parameters` JSON first,
    then the named inputs override it. Checked by the request model (tidar_runtime.request), as
    the HTTP server's requests are; a bad field raises FieldError."""
    opts = {}
    raw = _scalar(request, "sampling_parameters")
    if raw:
        try:
            opts = json.loads(raw)
        except ValueError:
            raise TiDARError("sampling_parameters is not valid JSON") from None
        if not isinstance(opts, dict):
            raise TiDARError("sampling_parameters must be a JSON object")
        unknown = sorted(set(opts) - set(SAMPLING_KEYS))
        if unknown:
            raise TiDARError(f"sampling_parameters: unsupported key(s) {', '.join(unknown)}")
    for name, key in (("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                      ("random_seed", "seed"), ("max_tokens", "max_tokens")):
        v = _scalar(request, name)
        if v is not None:
            opts[key] = v
    stop = opts.get("stop", opts.get("stop_words"))
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list):
        raise FieldError("stop", "must be a string or a list of strings")
    stop = stop + [s for s in _strings(request, "stop_words") if s]
    params = SamplingParams(opts.get("temperature", 0.0), opts.get("top_k", 0), opts.get("top_p", 1.0),
                            opts.get("seed"))
    end_id = _scalar(request, "end_id")
    return GenerationRequest(_scalar(request, "text_input"), opts.get("max_tokens", DEFAULT_MAX_TOKENS), params,
                             stop, None if end_id is None else (end_id,), bool(_scalar(request, "stream")))


def _response(text, tokens, finish_reason=None):
    outputs = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
               pb_utils.Tensor("output_ids", np.array(tokens, dtype=np.int32))]
    if finish_reason is not None:
        outputs.append(pb_utils.Tensor("finish_reason", np.array([finish_reason.encode()], dtype=np.object_)))
    return pb_utils.InferenceResponse(output_tensors=outputs)


def _error(message, code=None):
    err = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(error=err)


class _Request:
    """One request's response side: called by the engine thread with each Event."""

    def __init__(self, model, sender, stream):
        self.model, self.sender, self.stream = model, sender, stream
        self.id = uuid.uuid4().hex
        self.handle = None
        self.text, self.tokens = [], []
        self.cancelled = False

    def on_event(self, ev):
        if self.cancelled:
            return
        if getattr(self.sender, "is_cancelled", None) is not None and self.sender.is_cancelled():
            self.cancelled = True
            self.model.engine.abort(self.id)
            self._send(_response("", [], "abort"), FINAL)
            return
        if ev.finish_reason == "error":
            message = "the engine failed on this request"
            if self.handle is not None and self.handle.done:
                message = self.handle.result().error or message
            self._send(_error(message), FINAL)
            return
        if self.stream:
            if ev.finish_reason is None:
                self._send(_response(ev.text, ev.tokens))
            else:
                self._send(_response(ev.text, ev.tokens, ev.finish_reason), FINAL)
            return
        self.text.append(ev.text)
        self.tokens += ev.tokens
        if ev.finish_reason is not None:
            self._send(_response("".join(self.text), self.tokens, ev.finish_reason), FINAL)

    def _send(self, response, flags=0):
        try:
            self.sender.send(response, flags=flags)
        except Exception as e:  # noqa: BLE001 (the client is gone: free the row)
            self.cancelled = True
            self.model.engine.abort(self.id)
            pb_utils.Logger.log_warn(f"tidar: request {self.id}: cannot send a response ({e})")


class _Metrics:
    """Engine figures as Triton custom metrics (its /metrics endpoint), when the stub has them."""

    def __init__(self, labels):
        self._families = []  # a family must outlive its metrics

        def metric(name, description, kind):
            family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            self._families.append(family)
            return family.Metric(labels=labels)

        counter = lambda n, d: metric(n, d, pb_utils.MetricFamily.COUNTER)  # noqa: E731
        gauge = lambda n, d: metric(n, d, pb_utils.MetricFamily.GAUGE)  # noqa: E731
        self.steps = counter("tidar_steps_total", "Batched decode passes")
        self.row_steps = counter("tidar_row_steps_total", "Rows decoded, summed over the batched passes")
        self.prefills = counter("tidar_prefills_total", "Prefill passes (one per admitted request)")
        self.tokens = counter("tidar_tokens_total", "Tokens generated")
        finished = pb_utils.MetricFamily(name="tidar_requests_finished_total", kind=pb_utils.MetricFamily.COUNTER,
                                         description="Requests finished, by finish reason")
        self._families.append(finished)
        self.finished = {r: finished.Metric(labels={**labels, "reason": r}) for r in FINISH_REASONS}
        self.active = gauge("tidar_active_rows", "Batch rows decoding")
        self.queue = gauge("tidar_queue_depth", "Requests waiting for a row")
        self.engine = None

    def on_pass(self, kind, seconds, tokens):
        (self.steps if kind == "step" else self.prefills).increment(1)
        if kind == "step":
            self.row_steps.increment(len(tokens))
        self.tokens.increment(sum(tokens))
        self._gauges()

    def on_finish(self, completion):
        self.finished[completion.finish_reason].increment(1)
        self._gauges()  # called once the request's row is free

    def _gauges(self):
        if self.engine is not None:
            s = self.engine.snapshot()
            self.active.set(s.active_rows)
            self.queue.set(s.queue_depth)

    def close(self):
        """Drop the metrics before their families (the stub requires that order)."""
        for name in ("steps", "row_steps", "prefills", "tokens", "finished", "active", "queue"):
            setattr(self, name, None)
        self._families.clear()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        backend, mode = params.get("backend", "ort"), params.get("mode", "tidar")
        artifact = os.path.join(args["model_repository"], args["model_version"], params.get("artifact", "artifact"))
        kwargs = {}
        if backend == "ort":
            kwargs["intra_op_threads"] = int(params.get("intra_op_threads", "0") or 0)
        else:
            kwargs["device"] = int(args.get("model_instance_device_id") or 0)
        if backend == "trt":  # only the engines this mode runs (each holds its own weights)
            kwargs["kinds"] = ("prefill", "step") if mode == "tidar" else ("prefill", "ar_step")
        self.engine = open_engine(artifact, backend=backend, mode=mode,
                                  max_queue=int(params.get("max_queue", "64") or 64), **kwargs)
        self.drain_timeout = float(params.get("drain_timeout", "30") or 30)
        self.metrics = None
        if hasattr(pb_utils, "MetricFamily"):
            try:
                self.metrics = _Metrics({"model": args["model_name"], "instance": args["model_instance_name"]})
                self.metrics.engine = self.engine
                self.engine.add_listener(self.metrics)
            except Exception as e:  # noqa: BLE001 (metrics are optional: e.g. --allow-metrics false)
                pb_utils.Logger.log_warn(f"tidar: no custom metrics ({e})")
                self.metrics = None
        pb_utils.Logger.log_info(
            f"tidar: {args['model_instance_name']}: {mode} over {backend}, batch of {self.engine.max_batch} rows")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                req = parse_request(request)
                r = _Request(self, sender, req.stream)
                r.handle = self.engine.submit(req, request_id=r.id, on_event=r.on_event)
            except QueueFull as e:
                code = getattr(pb_utils.TritonError, "UNAVAILABLE", None)
                sender.send(_error(str(e), code), flags=FINAL)
            except FieldError as e:
                code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
                sender.send(_error(e.named(INPUT_NAMES.get(e.field, e.field)), code), flags=FINAL)
            except TiDARError as e:
                code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
                sender.send(_error(str(e), code), flags=FINAL)
            except Exception as e:  # noqa: BLE001 (a fault of ours: one log line, the other requests go on)
                pb_utils.Logger.log_error(f"tidar: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                sender.send(_error(f"internal error ({type(e).__name__})"), flags=FINAL)
        return None

    def finalize(self):
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        aborted = engine.drain(self.drain_timeout)  # in-flight requests finish; then the rest end with "abort"
        s = engine.snapshot()
        pb_utils.Logger.log_info(
            f"tidar: engine done: {s.submitted} requests, {s.prefills} prefills, {s.steps} steps, "
            f"{s.row_steps} row-steps, {s.tokens_generated} tokens, {aborted} ended by the drain")
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
