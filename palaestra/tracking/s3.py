"""Artifacts in S3 (or MinIO, or any S3-compatible store): the check a run makes before it relies on them.

MLflow keeps a run's artifacts wherever its experiment's artifact location says. A tracking server started with
``--artifacts-destination s3://...`` takes them over HTTP and writes them to S3 itself (the client needs no
credentials). A server started with ``--default-artifact-root s3://... --no-serve-artifacts``, the layout of a
MinIO setup, hands the client the ``s3://`` location, and the client writes there with boto3. It uses the
endpoint in ``MLFLOW_S3_ENDPOINT_URL`` and the credentials in ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
(or any other source boto3 reads). :func:`s3_problem` tries that access once, cheaply, and says in a few words
why it fails, before a run's first artifact does.
"""

from __future__ import annotations

import os
from urllib.parse import urlparse

__all__ = ["s3_problem"]

_REFUSED_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                        "ExpiredToken")


def s3_problem(artifact_location: str) -> str | None:
    """Why this process cannot write to the S3 bucket of ``artifact_location`` (``s3://bucket/prefix``), or None
    when it can (or the location is not in S3). One request, without boto3's retries, a 10 s limit."""
    if not str(artifact_location).startswith("s3://"):
        return None
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
    except ImportError:
        return "boto3 is not installed (pip install boto3)"
    bucket = urlparse(artifact_location).netloc
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    where = f"the S3 endpoint {endpoint}" if endpoint else "AWS S3"
    client = boto3.client("s3", endpoint_url=endpoint,
                          config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 1}))
    try:
        client.head_bucket(Bucket=bucket)
    except NoCredentialsError:
        return "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    except EndpointConnectionError:
        return f"{where} does not answer; check MLFLOW_S3_ENDPOINT_URL"
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in _REFUSED_CREDENTIALS:
            return f"{where} refused the credentials ({code}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        if code in ("404", "NoSuchBucket"):
            return f"{where} has no bucket {bucket!r}; create it or fix the experiment's artifact location"
        return f"{where} answered {code or 'an error'} for bucket {bucket!r}"
    except (BotoCoreError, ValueError) as error:
        return f"{where} cannot be used: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    return None
