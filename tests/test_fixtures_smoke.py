import ray


def test_ray_head_runs_a_task(ray_head):
    ray.init(address=ray_head.address, namespace="fixture-smoke")
    try:
        @ray.remote
        def f(x):
            return x + 1

        assert ray.get(f.remote(41)) == 42
        assert ray.cluster_resources().get("GPU") == 1
    finally:
        ray.shutdown()


def test_s3_server_roundtrip(s3_server):
    fs = s3_server.fs()
    b = s3_server.make_bucket()
    fs.pipe(f"{b}/x.txt", b"hello")
    assert fs.cat(f"{b}/x.txt") == b"hello"
