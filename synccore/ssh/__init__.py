"""SSH transport: a byte pipe to ``diskrsync`` running on another host.

The sync engine talks its binary protocol over the stdin/stdout of a remote command; this
package only opens that pipe and keeps it honest. It connects with paramiko as OpenSSH would
and turns every way a connection can fail (refused, no such host, silence, changed host key,
rejected keys, missing command, dropped link) into a one-line ``PeerError``/``LocalError``
instead of a paramiko traceback. One module per concern:

- ``config``: ``SshOptions`` and ssh_config applied to a host as OpenSSH reads it (Include,
  the system-wide file; no paramiko import until a config file is read, so building options
  stays cheap);
- ``known_hosts``: host-key verification and accept-new;
- ``auth``: public-key authentication (files, agent, defaults);
- ``connection``: reaching the host (TCP, ProxyCommand, ProxyJump), transport tuning, the
  keepalive watchdog, ``connect`` and ``SshConnection``;
- ``process``: ``RemoteProcess``, the remote command's stdin/stdout/stderr;
- ``external``: ``ExternalProcess``, the same pipe through an external program
  (``--rsh 'ssh ...'``), with ssh's own failures turned into the errors below;
- ``errors``: the ``PeerError`` subclasses all of these raise.

Locations (``host:path``) are parsed in ``synccore.location``, which needs no SSH at all.
"""
