"""gRPC streaming client for tests/test_triton.py, run by the Triton environment's Python
(tritonclient[grpc] is installed there with the server; the test suite's own environment
keeps its numpy and protobuf). Reads a JSON list of requests on stdin, sends each over its
own gRPC stream, all at once (one thread each), and prints one JSON list of results.

Request: {"text_input": str, "max_tokens": int, "stream": bool, optional "temperature",
"top_k", "top_p", "random_seed", "stop_words", and "cancel_after": N to cancel the stream
after N responses (the result's finish_reason is then "cancelled")}. Result: {"pieces": [text per response],
"ids": [token ids], "finish_reason": str | None, "error": str | None}.
"""

import json
import queue
import sys
import threading

import numpy as np
import tritonclient.grpc as grpcclient

TYPES = {"text_input": ("BYTES", np.object_), "max_tokens": ("INT32", np.int32), "stream": ("BOOL", bool),
         "temperature": ("FP32", np.float32), "top_k": ("INT32", np.int32), "top_p": ("FP32", np.float32),
         "random_seed": ("UINT64", np.uint64), "stop_words": ("BYTES", np.object_)}


def run_one(url, model, request, timeout):
    request = dict(request)
    cancel_after = request.pop("cancel_after", None)  # cancel the stream after this many responses
    inputs = []
    for name, value in request.items():
        kind, dtype = TYPES[name]
        values = value if isinstance(value, list) else [value]
        if kind == "BYTES":
            values = [v.encode("utf-8") for v in values]
        arr = np.array(values, dtype=dtype)
        t = grpcclient.InferInput(name, list(arr.shape), kind)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    responses = queue.Queue()
    result = {"pieces": [], "ids": [], "finish_reason": None, "error": None}
    with grpcclient.InferenceServerClient(url) as client:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        while True:
            res, err = responses.get(timeout=timeout)
            if err is not None:
                result["error"] = str(err)
                break
            r = res.get_response()
            if len(r.outputs):
                result["pieces"].append(res.as_numpy("text_output").reshape(-1)[0].decode("utf-8"))
                result["ids"] += [int(i) for i in res.as_numpy("output_ids").reshape(-1)]
                fr = res.as_numpy("finish_reason")
                if fr is not None:
                    result["finish_reason"] = fr.reshape(-1)[0].decode("utf-8")
            if r.parameters.get("triton_final_response") and r.parameters["triton_final_response"].bool_param:
                break
            if cancel_after is not None and len(result["pieces"]) >= cancel_after:
                result["finish_reason"] = "cancelled"
                client.stop_stream(cancel_requests=True)
                return result
        client.stop_stream()
    return result


def main():
    url, model, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    requests = json.load(sys.stdin)
    results = [None] * len(requests)

    def work(i):
        try:
            results[i] = run_one(url, model, requests[i], timeout)
        except Exception as e:  # reported to the test, which fails on it
            results[i] = {"pieces": [], "ids": [], "finish_reason": None, "error": f"client: {e!r}"}

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
