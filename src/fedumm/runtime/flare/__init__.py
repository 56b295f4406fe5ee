"""The NVIDIA FLARE runtime: the same config and algorithms, run by FLARE.

- ``job.py`` builds a FLARE job (Job API) from a config: fedumm's controller on the server,
  FLARE's Client API executor running ``fedumm_client.py`` on every site;
- ``controller.py`` is the server workflow (a FLARE ``ModelController``) that calls fedumm's
  strategy objects and writes the run directory;
- ``client.py`` is the site side: fedumm's client trainer behind FLARE's Client API;
- ``runner.py`` runs a job in FLARE's simulator or a POC deployment on loopback, or exports it.
"""
