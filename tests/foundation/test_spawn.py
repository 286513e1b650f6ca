"""nemo_basic.testing.spawn: the helper every distributed test starts its gloo processes with."""


def test_free_port_lies_below_the_ephemeral_range_and_is_free():
    """Rendezvous ports are not drawn where the kernel gives outgoing connections their ports."""
    import socket

    from nemo_basic.testing.spawn import _ephemeral_low, free_port

    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(max(1024, low - 12000) <= p < low for p in ports), (low, sorted(ports))
    assert len(ports) > 1  # drawn, not a fixed port
    for p in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", p))
