"""fieldgate's device simulator: an outside client that loads a gateway like a fleet would and
proves what it stored. It speaks HTTP and MQTT and imports nothing from `gateway/` or `devices/`.

    signals   what a sensor reads (sine + noise, random walk, counter, steps), seeded
    profile   which metrics a device has (TOML/JSON)
    faults    invalid messages on purpose, with the code the gateway must answer
    fleet     devices, ready-to-send bodies (one orjson call per batch), the ledger of what was sent
    gateway_api / mqtt   the two ways in; verify   read back and compare
    report    live progress, summary table, JSON report; run   one run, start to end
    senders   --processes N: the fleet's sending split across processes, merged into one run
    schedule  whether the live phase kept its schedule, and who was the limit if not
"""
