package bench

// DovecotExtra is what the harnesses add to internal/testenv's Dovecot
// (DovecotOptions.Extra) to hold thousands of IDLE sessions: idle sessions
// move into imap-hibernate after 2 s, so only those opened in the last
// few seconds hold an imap process each; hibernate processes take up to
// 5,000 sessions each (a process may have 20,000 descriptors here).
// fs.inotify.max_user_instances must allow one inotify instance per imap
// process as well.
const DovecotExtra = `imap_hibernate_timeout = 2s
mail_max_userip_connections = 20000
default_client_limit = 20000
service imap {
  process_limit = 10000
}
service imap-hibernate {
  client_limit = 5000
  process_limit = 8
}
service anvil {
  client_limit = 20000
}
`
