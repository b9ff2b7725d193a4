"""Subject-entitlement operations of OpenMeter's official Python client (openmeter 1.0.0b236), restored.

The client generates them and then loses them: ``openmeter/_generated/operations/_operations.py`` defines
``class SubjectsOperations`` twice. The first definition holds the entitlement operations (``post``,
``list``, ``get``, ``delete``, ``override``, ``get_grants``, ``create_grant``, ``get_entitlement_value``,
``get_entitlement_history``, ``reset``); the second one, later in the file, holds the subject operations
(``list``, ``get``, ``upsert``, ``delete``) and overwrites the first, together with a second set of
``build_subjects_*`` request builders. So ``client.subjects`` has no entitlement methods, and there is no
other way to reach value, history, reset, override or a subject's grants through the public client.

:func:`subject_entitlements` re-executes the client's *own first* definitions (the first builders and the
first ``SubjectsOperations``), sliced from the installed source, in a private copy of the module's
namespace. The methods are the generated code unchanged: same URLs, serialisation, status checks, error
mapping and deserialisation, sent through the client's pipeline (its retry and auth policies). Nothing
in the installed package is modified.

It depends on the text of that exact version; the markers are checked so a different version fails here,
loudly, rather than somewhere obscure.
"""

from __future__ import annotations

import inspect
from typing import Any

from openmeter import Client
from openmeter._generated.operations import _operations as _ops

#: The first entitlement builder, the first subject-only builder (the shadowing set starts there), the
#: first ``SubjectsOperations`` and the class right after it.
_BUILDERS_FROM = "def build_subjects_post_request("
_BUILDERS_TO = "def build_subjects_list_request(**kwargs"
_CLASS_FROM = "class SubjectsOperations:"
_CLASS_TO = "class CustomerOperations:"

OPERATIONS = (
    "post",
    "list",
    "get",
    "delete",
    "override",
    "get_grants",
    "create_grant",
    "get_entitlement_value",
    "get_entitlement_history",
    "reset",
)


def subject_entitlements(client: Client) -> Any:
    """The subject-entitlement operations bound to ``client`` (``post(subject, body)``,
    ``get_entitlement_value(subject, id_or_feature_key, time=...)``, ...; see the client's docstrings)."""
    source = inspect.getsource(_ops)
    b0, b1 = source.index(_BUILDERS_FROM), source.index(_BUILDERS_TO)
    c0 = source.index(_CLASS_FROM)
    c1 = source.index(_CLASS_TO, c0)
    if not b0 < b1 < c0 < c1:
        raise RuntimeError("openmeter's generated operations are not laid out as in 1.0.0b236")
    namespace = dict(vars(_ops))
    code = compile(source[b0:b1] + "\n" + source[c0:c1], str(_ops.__file__), "exec")
    exec(code, namespace)
    ops = namespace["SubjectsOperations"](client._client, client._config, client._serialize, client._deserialize)
    missing = [name for name in OPERATIONS if not callable(getattr(ops, name, None))]
    if missing:
        raise RuntimeError(f"the restored subject-entitlement operations lack {missing}")
    return ops
