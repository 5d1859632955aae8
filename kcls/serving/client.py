"""Client side of a kcls export served by TF Serving: request builders, response parsers.

The builders and parsers are pure functions that follow TF Serving's documented
contract (https://www.tensorflow.org/tfx/serving/api_rest and
`tensorflow_serving/apis/predict.proto`), so they can be tested without a server;
`rest_predict` and `grpc_predict` add the transport.

REST (`POST /v1/models/<name>[/versions/<v>]:predict`, port 8501), row format:

    {"signature_name": "serving_default", "instances": [{"b64": "<base64 JPEG>"}, ...]}

Binary strings travel as `{"b64": ...}` objects; with a single named input (the export's
`image_bytes`) each instance is that object itself. The columnar form sends
`{"inputs": {"image_bytes": [{"b64": ...}, ...]}}` instead.

gRPC (`PredictionService/Predict`, port 8500): a `PredictRequest` with `model_spec.name`,
`model_spec.signature_name` and `inputs["image_bytes"]`, a `DT_STRING` tensor `[N]` of
encoded images. It needs the TF Serving protos: `pip install tensorflow-serving-api`
(or `pip install "kcls[serving]"`), imported only when a gRPC function is called.

Example:

>>> request = rest_predict_request([Path("digit.png").read_bytes()])  # doctest: +SKIP
>>> predictions = rest_predict("http://localhost:8501", "quickstart",
...                            [Path("digit.png").read_bytes()])  # doctest: +SKIP
>>> predictions[0].top(1)  # doctest: +SKIP
[('7', 0.98)]
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_SIGNATURE = "serving_default"
CLASSIFY_SIGNATURE = "classify"
IMAGE_INPUT = "image_bytes"  # the input of `serving_default`, see kcls.serving.export
OUTPUTS = ("probabilities", "classes", "scores", "labels")
DEFAULT_TIMEOUT = 30.0


class ServingError(RuntimeError):
    """TF Serving could not be reached or answered with an error; the message is one line."""


class MissingServingApiError(ImportError):
    """The optional `tensorflow-serving-api` package that gRPC requests need is not installed."""


@dataclass
class Prediction:
    """The `serving_default` outputs for one image.

    Attributes:
        labels: list[str], the top-k class names, best first.
        scores: list[float], their probabilities.
        classes: list[int], their class indices.
        probabilities: list[float], one per class (empty when the server left it out).
        known: whether the model's rejection rule knows the image (None: no rule).
    """

    labels: list[str]
    scores: list[float]
    classes: list[int]
    probabilities: list[float]
    known: bool | None = None

    def top(self, k: int | None = None) -> list[tuple[str, float]]:
        """The best `k` (all top-k by default) `(label, probability)` pairs, best first."""
        return list(zip(self.labels, self.scores))[:k]


# ---------------------------------------------------------------------------------------
# REST
# ---------------------------------------------------------------------------------------


def rest_url(server: str, model_name: str, version: int | None = None,
             verb: str = "predict") -> str:
    """The TF Serving REST endpoint for `model_name`.

    Args:
        server: str, `http://host:8501` (a missing `http://` is added).
        model_name: str, the served model name (the folder under `saved_models/`).
        version: int, a specific version; `None` lets the server pick the latest.
        verb: `predict` or `classify`.

    Returns:
        e.g. `http://host:8501/v1/models/quickstart/versions/2:predict`.

    Raises:
        ValueError: a server address without a host, or an unknown verb.
    """
    if verb not in ("predict", "classify"):
        raise ValueError(f"Unknown TF Serving verb {verb!r}: expected predict or classify.")
    if "://" not in server:
        server = f"http://{server}"
    parsed = urllib.parse.urlsplit(server)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"Invalid TF Serving address {server!r}: expected "
                         "http://HOST:PORT, e.g. http://localhost:8501.")
    path = f"/v1/models/{urllib.parse.quote(model_name, safe='')}"
    if version is not None:
        path += f"/versions/{int(version)}"
    return f"{server.rstrip('/')}{path}:{verb}"


def rest_predict_request(images: Sequence[bytes], signature_name: str = DEFAULT_SIGNATURE,
                         columnar: bool = False) -> dict[str, Any]:
    """The JSON body of a REST `:predict` request for encoded images.

    Args:
        images: sequence of encoded images (JPEG, PNG, GIF or BMP bytes).
        signature_name: the signature to call.
        columnar: send the columnar `inputs` form instead of the row `instances` form.

    Returns:
        `{"signature_name": ..., "instances": [{"b64": ...}, ...]}`, or with
        `columnar=True` `{"signature_name": ..., "inputs": {"image_bytes": [{"b64": ...}]}}`.
        Either way the server builds a tf.string tensor `[N]` for `image_bytes`.
    """
    encoded = [_b64(image) for image in _as_bytes_list(images)]
    if columnar:
        return {"signature_name": signature_name, "inputs": {IMAGE_INPUT: encoded}}
    return {"signature_name": signature_name, "instances": encoded}


def rest_classify_request(images: Sequence[bytes],
                          signature_name: str = CLASSIFY_SIGNATURE) -> dict[str, Any]:
    """The JSON body of a REST `:classify` request (the export's `classify` signature).

    Returns:
        `{"signature_name": "classify", "examples": [{"image_bytes": {"b64": ...}}, ...]}`:
        one tf.Example per image with a bytes feature `image_bytes`.
    """
    return {"signature_name": signature_name,
            "examples": [{IMAGE_INPUT: _b64(image)} for image in _as_bytes_list(images)]}


def parse_rest_predict_response(body: Mapping[str, Any]) -> list[Prediction]:
    """Predictions from the JSON answer to a `:predict` request, one per image.

    Accepts both answer forms: `{"predictions": [{"labels": ..., ...}, ...]}` (row
    requests) and `{"outputs": {"labels": [[...]], ...}}` (columnar requests).

    Raises:
        ServingError: an `{"error": ...}` body or one without the export's outputs.
    """
    if "error" in body:
        raise ServingError(_one_line(str(body["error"])))
    if isinstance(body.get("predictions"), list):
        rows = body["predictions"]
    elif isinstance(body.get("outputs"), Mapping):
        columns = body["outputs"]
        count = len(columns.get("labels", []))
        rows = [{name: values[index] for name, values in columns.items()}
                for index in range(count)]
    else:
        raise ServingError("TF Serving answer has neither 'predictions' nor 'outputs': "
                           + _one_line(json.dumps(body))[:200])
    try:
        return [_prediction(row) for row in rows]
    except (KeyError, TypeError) as error:
        raise ServingError(f"TF Serving answer lacks the kcls outputs {OUTPUTS} ({error!r}); "
                           "is the model a kcls export and the signature serving_default?"
                           ) from None


def parse_rest_classify_response(body: Mapping[str, Any]) -> list[list[tuple[str, float]]]:
    """`(label, score)` pairs per image from the answer to a `:classify` request.

    TF Serving answers `{"results": [[[label, score], ...], ...]}` (its docs say
    `result`; both are accepted).
    """
    if "error" in body:
        raise ServingError(_one_line(str(body["error"])))
    results = body.get("results", body.get("result"))
    if not isinstance(results, list):
        raise ServingError("TF Serving answer has no 'results': "
                           + _one_line(json.dumps(body))[:200])
    return [[(str(label), float(score)) for label, score in result] for result in results]


def rest_predict(server: str, model_name: str, images: Sequence[bytes], *,
                 version: int | None = None, signature_name: str = DEFAULT_SIGNATURE,
                 timeout: float = DEFAULT_TIMEOUT) -> list[Prediction]:
    """Classifies encoded images with a model served over TF Serving's REST API.

    Args:
        server: str, e.g. `http://localhost:8501`.
        model_name: str, the served model name.
        images: sequence of encoded images (bytes).
        version: int, a specific model version; `None` for the latest.
        signature_name: the signature to call.
        timeout: seconds to wait for the answer.

    Returns:
        list[Prediction], one per image, in order.

    Raises:
        ServingError: connection failure, timeout or an HTTP error; the message is one
            line and includes TF Serving's `error` text.
    """
    url = rest_url(server, model_name, version)
    body = json.dumps(rest_predict_request(images, signature_name)).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise ServingError(f"TF Serving at {url} answered HTTP {error.code}: "
                           f"{_error_text(error)}") from None
    except urllib.error.URLError as error:
        raise ServingError(f"cannot reach TF Serving at {url}: {_one_line(str(error.reason))}. "
                           "Is the server running and its REST port (8501) published?") from None
    except TimeoutError:
        raise ServingError(f"TF Serving at {url} did not answer within {timeout:g} s.") from None
    except json.JSONDecodeError:
        raise ServingError(f"TF Serving at {url} answered with invalid JSON.") from None
    return parse_rest_predict_response(answer)


# ---------------------------------------------------------------------------------------
# gRPC
# ---------------------------------------------------------------------------------------


def image_bytes_tensor_proto(images: Sequence[bytes]) -> Any:
    """A `tensorflow.TensorProto` of dtype `DT_STRING` and shape `[N]` holding the images.

    The same proto `tf.make_tensor_proto(images, dtype=tf.string)` returns, built
    directly from the proto classes.
    """
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    images = _as_bytes_list(images)
    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=len(images))]),
        string_val=images)


def grpc_predict_request(images: Sequence[bytes], model_name: str,
                         signature_name: str = DEFAULT_SIGNATURE,
                         version: int | None = None) -> Any:
    """A `tensorflow.serving.PredictRequest` for encoded images.

    Args:
        images: sequence of encoded images (bytes).
        model_name: str, the served model name (`model_spec.name`).
        signature_name: str (`model_spec.signature_name`).
        version: int (`model_spec.version.value`); `None` for the latest.

    Returns:
        `PredictRequest` whose `inputs["image_bytes"]` is a `DT_STRING` tensor `[N]`.

    Raises:
        MissingServingApiError: `tensorflow-serving-api` is not installed.
    """
    predict_pb2, _ = _serving_apis()
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    request.inputs[IMAGE_INPUT].CopyFrom(image_bytes_tensor_proto(images))
    return request


def parse_grpc_predict_response(response: Any) -> list[Prediction]:
    """Predictions, one per image, from a `tensorflow.serving.PredictResponse`."""
    import tensorflow as tf

    missing = [name for name in ("labels", "scores", "classes") if name not in response.outputs]
    if missing:
        raise ServingError(f"TF Serving answer lacks the outputs {missing}; is the model a "
                           "kcls export and the signature serving_default?")
    columns = {name: tf.make_ndarray(proto).tolist() for name, proto in response.outputs.items()}
    count = len(columns["labels"])
    return [_prediction({name: values[index] for name, values in columns.items()})
            for index in range(count)]


def grpc_predict(target: str, model_name: str, images: Sequence[bytes], *,
                 version: int | None = None, signature_name: str = DEFAULT_SIGNATURE,
                 timeout: float = DEFAULT_TIMEOUT) -> list[Prediction]:
    """Classifies encoded images with a model served over TF Serving's gRPC API.

    Args:
        target: str, `host:8500`.
        model_name, version, signature_name, timeout: as in `rest_predict`.

    Returns:
        list[Prediction], one per image, in order.

    Raises:
        ValueError: `target` is not `HOST:PORT`.
        MissingServingApiError: `tensorflow-serving-api` is not installed.
        ServingError: the call failed (unreachable server, unknown model, bad image);
            the message is one line with the gRPC status.
    """
    import grpc

    if "://" in target or ":" not in target:
        raise ValueError(f"Invalid gRPC target {target!r}: expected HOST:PORT, "
                         "e.g. localhost:8500 (no http://).")
    request = grpc_predict_request(images, model_name, signature_name, version)
    _, prediction_service_pb2_grpc = _serving_apis()
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout)
        except grpc.RpcError as error:
            code = error.code().name if error.code() else "UNKNOWN"
            raise ServingError(f"TF Serving gRPC at {target} failed with {code}: "
                               f"{_one_line(error.details() or '')}") from None
    return parse_grpc_predict_response(response)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _serving_apis() -> tuple[Any, Any]:
    try:
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError:
        raise MissingServingApiError(
            "gRPC requests need the TF Serving API protos: pip install tensorflow-serving-api "
            "(or pip install \"kcls[serving]\"). The REST client (--server) needs nothing extra."
        ) from None
    return predict_pb2, prediction_service_pb2_grpc


def _as_bytes_list(images: Sequence[bytes]) -> list[bytes]:
    if isinstance(images, (bytes, bytearray)):
        raise TypeError("images must be a sequence of encoded images, e.g. [image_bytes], "
                        "not a single bytes object.")
    images = [bytes(image) for image in images]
    if not images:
        raise ValueError("images is empty: a request needs at least one image.")
    return images


def _b64(image: bytes) -> dict[str, str]:
    return {"b64": base64.b64encode(image).decode("ascii")}


def _prediction(row: Mapping[str, Any]) -> Prediction:
    return Prediction(labels=[_text(label) for label in row["labels"]],
                      scores=[float(score) for score in row["scores"]],
                      classes=[int(index) for index in row["classes"]],
                      probabilities=[float(p) for p in row.get("probabilities", [])],
                      known=None if row.get("known") is None else bool(row["known"]))


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping) and "b64" in value:  # outputs named *_bytes come as b64
        return base64.b64decode(value["b64"]).decode("utf-8", errors="replace")
    return str(value)


def _error_text(error: urllib.error.HTTPError) -> str:
    raw = error.read()
    try:
        return _one_line(str(json.loads(raw)["error"]))
    except (ValueError, KeyError, TypeError):
        return _one_line(raw.decode("utf-8", errors="replace") or str(error.reason))[:300]


def _one_line(text: str) -> str:
    return " ".join(text.split())


__all__ = [
    "Prediction", "ServingError", "MissingServingApiError", "rest_url", "rest_predict_request",
    "rest_classify_request", "parse_rest_predict_response", "parse_rest_classify_response",
    "rest_predict", "image_bytes_tensor_proto", "grpc_predict_request",
    "parse_grpc_predict_response", "grpc_predict",
]
