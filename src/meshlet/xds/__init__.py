"""meshlet.xds: Envoy's xDS over one aggregated gRPC stream (ADS), both sides.

Control plane:
  ``snapshot``  ``Snapshot.build({LISTENER: [...], CLUSTER: [...], ...})``: Envoy v3
                messages packed once, content-versioned per resource and per type.
  ``cache``     ``SnapshotCache.set_snapshot(group, snapshot)``: debounced publishing,
                per-node status (``status()``, ``node_status(id)``; ACKed versions,
                last NACK with the proxy's error), ``add_connect_listener`` to build
                a snapshot when a new node appears, ``wait_acked`` for tests.
  ``server``    ``add_ads_servicer(grpc_aio_server, cache)`` or ``start_ads_server``:
                SotW and delta ADS (``streams`` holds the sans-IO protocol logic).
  ``validate``  ``check_snapshot(snapshot)``: what a meshlet proxy would build from it.
  ``loadgen``   simulated proxies on real streams, for benchmarks.

Proxy:
  ``client``    ``AdsClient(proxy, bootstrap_config)``: follows the ADS server named by
                the bootstrap's ``dynamic_resources``; ``assembly`` turns accepted
                resources into one ``ProxyConfig`` with the static-file compiler;
                ``deps`` finds the RDS/EDS/SDS names resources refer to.
  ``dump``      what a server serves one node (``meshlet xds dump``).
"""
