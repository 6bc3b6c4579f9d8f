"""Serving inside vLLM, one module per process: the plugin entry point (:mod:`.plugin`), the API
server (:mod:`.api`), the EngineCore (:mod:`.engine_core`), the workers (:mod:`.worker`); the settings and
policy they share (:mod:`.settings`, :mod:`.policy`), and a launcher of a server as a child process
(:mod:`.launcher`)."""
