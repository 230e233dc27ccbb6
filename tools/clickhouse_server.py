"""A local ClickHouse server for tests and the demo (dev/test tooling only).

The chdb-core wheel embeds ClickHouse, including its HTTP and native TCP listeners. This starts
them on 127.0.0.1 with the given ports and blocks forever. The server ignores SIGTERM: stop it with
SIGKILL by pid. It uses a private chDB entry point, so tools/requirements-dev.txt pins the version.

    python tools/clickhouse_server.py --http-port 8123 --tcp-port 9000 --dir /tmp/ch

--config-extra FILE adds the file's XML elements to config.xml's <clickhouse> root (the cluster
tests' <remote_servers>, <macros>, <zookeeper>, ...). They come after the listeners' elements
and must not repeat them.
"""

import argparse
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--tcp-port", type=int, required=True)
    parser.add_argument("--dir", required=True, help="config and data directory")
    parser.add_argument(
        "--users",
        help="file of further <user> elements for users.xml (e.g. one with <grants>)",
    )
    parser.add_argument(
        "--config-extra",
        help="file of further top-level elements for config.xml (e.g. <remote_servers>)",
    )
    args = parser.parse_args()
    more_users = ""
    if args.users:
        with open(args.users) as f:
            more_users = f.read()
    more_config = ""
    if args.config_extra:
        with open(args.config_extra) as f:
            more_config = f.read()

    os.makedirs(args.dir, exist_ok=True)
    with open(os.path.join(args.dir, "config.xml"), "w") as f:
        f.write(
            "<clickhouse><listen_host>127.0.0.1</listen_host>"
            f"<http_port>{args.http_port}</http_port><tcp_port>{args.tcp_port}</tcp_port>"
            f"<users_config>users.xml</users_config>{more_config}</clickhouse>"
        )
    # The usual `default` user (no password), and `relay_plus`, whose password has a `+` in it
    # (tests of URL percent-decoding: a `+` in a URL's password must stay a `+`). Users from
    # --users come after them: chDB's server takes users from users.xml only (CREATE USER needs
    # a writable access storage, which it does not set up), and enforces their <grants>.
    user = (
        "<password>{}</password><networks><ip>::/0</ip></networks>"
        "<profile>default</profile><quota>default</quota>"
    )
    with open(os.path.join(args.dir, "users.xml"), "w") as f:
        f.write(
            "<clickhouse><users>"
            f"<default>{user.format('')}</default>"
            f"<relay_plus>{user.format('p+w+x')}</relay_plus>"
            f"{more_users}"
            "</users><profiles><default/></profiles><quotas><default/></quotas></clickhouse>"
        )
    os.chdir(args.dir)

    import chdb._chdb as chdb  # imported after chdir: the server reads ./config.xml

    chdb.query(
        "SYSTEM START LISTEN HTTP; SYSTEM START LISTEN TCP; "
        "SELECT sleepEachRow(1) FROM system.numbers SETTINGS max_block_size=1 FORMAT Null",
        "TSV",
        path=os.path.join(args.dir, "data"),
    )


if __name__ == "__main__":
    main()
