# The IMAP backends as Consul services, for an agent's config directory
# (consul agent -config-dir). imapgate's Consul router routes to the
# instances of service "imap" whose checks pass.
#
# Service Meta read by imapgate (routing/consul.go):
#   imapgate-weight           share in rendezvous hashing, default 1
#   imapgate-security         none (default), tls or starttls
#   imapgate-tls-server-name  name to verify the certificate against
#   imapgate-drain            "true": no new users placed there
# Drain without editing this file: imapgate ctl drain dovecot1 (writes the
# KV flag imapgate/drain/dovecot1).

services = [
  {
    id      = "dovecot1"
    name    = "imap"
    address = "10.0.0.11"
    port    = 993
    tags    = ["dovecot"]
    meta = {
      imapgate-weight          = "1"
      imapgate-security        = "tls"
      imapgate-tls-server-name = "dovecot1.example.org"
    }
    checks = [
      {
        id       = "dovecot1-imaps"
        name     = "IMAPS port answers"
        tcp      = "10.0.0.11:993"
        interval = "5s"
        timeout  = "2s"
      },
      {
        # A failing check removes the backend from routing at once (no new
        # users, logins refused); after consul.grace (30s) its sessions are
        # closed and its unpinned users re-placed. Script checks need
        # enable_local_script_checks = true on this agent.
        id       = "dovecot1-service"
        name     = "dovecot.service active"
        args     = ["systemctl", "is-active", "--quiet", "dovecot"]
        interval = "10s"
        timeout  = "3s"
      },
    ]
  },
  {
    id      = "dovecot2"
    name    = "imap"
    address = "10.0.0.12"
    port    = 993
    tags    = ["dovecot"]
    meta = {
      imapgate-weight          = "2"
      imapgate-security        = "tls"
      imapgate-tls-server-name = "dovecot2.example.org"
    }
    checks = [
      {
        id       = "dovecot2-imaps"
        name     = "IMAPS port answers"
        tcp      = "10.0.0.12:993"
        interval = "5s"
        timeout  = "2s"
      },
    ]
  },
]
