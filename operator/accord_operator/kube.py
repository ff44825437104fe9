"""The operator's Kubernetes API client for what kopf does not do for us (version, events).

Loaded the way kopf logs in: in-cluster service account first, then the kubeconfig.
"""

from __future__ import annotations

import functools

from kubernetes import client, config


@functools.cache
def api_client() -> client.ApiClient:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api_client())


def server_version() -> str:
    info = client.VersionApi(api_client()).get_code()
    return str(info.git_version)
