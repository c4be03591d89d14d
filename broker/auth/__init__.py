"""Authentication: who a client is, decided by a chain of authenticators (EMQX's model).

:mod:`broker.auth.base` holds the types every backend shares; one module per backend
(``builtin``, ``password_file``, ``http``, ``jwt``, ``amqtt_plugin``, ``scram``); :mod:`broker.auth.chain`
tries them in order. ARCHITECTURE.md ("Authentication") says where the chain sits in admission.
"""
