-- agor's btmsg.db as agor's Rust app creates it (open_db_or_create), transcribed from
-- ../shared/reference/agor-facts.md §3.4 independently of agor_systemd/btmsg/schema.py, so that
-- tests compare the two. "now" is TEXT DEFAULT (datetime('now')).
CREATE TABLE agents (id TEXT PRIMARY KEY, name TEXT NOT NULL, role TEXT NOT NULL, group_id TEXT NOT NULL,
  tier INTEGER NOT NULL DEFAULT 2, model TEXT, cwd TEXT, system_prompt TEXT, status TEXT DEFAULT 'stopped',
  last_active_at TEXT, created_at TEXT DEFAULT (datetime('now')));
CREATE TABLE contacts (agent_id TEXT NOT NULL REFERENCES agents(id), contact_id TEXT NOT NULL REFERENCES agents(id),
  PRIMARY KEY (agent_id, contact_id));
CREATE TABLE messages (id TEXT PRIMARY KEY, from_agent TEXT NOT NULL REFERENCES agents(id),
  to_agent TEXT NOT NULL REFERENCES agents(id), content TEXT NOT NULL, read INTEGER DEFAULT 0, reply_to TEXT,
  group_id TEXT NOT NULL, sender_group_id TEXT, created_at TEXT DEFAULT (datetime('now')));
CREATE INDEX idx_messages_to ON messages(to_agent, read);
CREATE INDEX idx_messages_from ON messages(from_agent);
CREATE INDEX idx_messages_group ON messages(group_id);
CREATE INDEX idx_messages_reply ON messages(reply_to);
CREATE TABLE channels (id TEXT PRIMARY KEY, name TEXT NOT NULL, group_id TEXT NOT NULL, created_by TEXT NOT NULL,
  created_at TEXT DEFAULT (datetime('now')));
CREATE TABLE channel_members (channel_id TEXT NOT NULL REFERENCES channels(id), agent_id TEXT NOT NULL REFERENCES agents(id),
  joined_at TEXT DEFAULT (datetime('now')), PRIMARY KEY (channel_id, agent_id));
CREATE TABLE channel_messages (id TEXT PRIMARY KEY, channel_id TEXT NOT NULL REFERENCES channels(id),
  from_agent TEXT NOT NULL REFERENCES agents(id), content TEXT NOT NULL, created_at TEXT DEFAULT (datetime('now')));
CREATE INDEX idx_channel_messages ON channel_messages(channel_id, created_at);
CREATE TABLE tasks (id TEXT PRIMARY KEY, title TEXT NOT NULL, description TEXT DEFAULT '', status TEXT DEFAULT 'todo',
  priority TEXT DEFAULT 'medium', assigned_to TEXT REFERENCES agents(id), created_by TEXT NOT NULL REFERENCES agents(id),
  group_id TEXT NOT NULL, parent_task_id TEXT, sort_order INTEGER DEFAULT 0, created_at TEXT DEFAULT (datetime('now')),
  updated_at TEXT DEFAULT (datetime('now')), version INTEGER DEFAULT 1);
CREATE INDEX idx_tasks_group ON tasks(group_id);
CREATE INDEX idx_tasks_status ON tasks(status);
CREATE INDEX idx_tasks_assigned ON tasks(assigned_to);
CREATE TABLE task_comments (id TEXT PRIMARY KEY, task_id TEXT NOT NULL REFERENCES tasks(id),
  agent_id TEXT NOT NULL REFERENCES agents(id), content TEXT NOT NULL, created_at TEXT DEFAULT (datetime('now')));
CREATE INDEX idx_task_comments_task ON task_comments(task_id);
CREATE TABLE heartbeats (agent_id TEXT PRIMARY KEY REFERENCES agents(id), timestamp INTEGER NOT NULL);
CREATE TABLE dead_letter_queue (id INTEGER PRIMARY KEY AUTOINCREMENT, from_agent TEXT NOT NULL REFERENCES agents(id),
  to_agent TEXT NOT NULL REFERENCES agents(id), content TEXT NOT NULL, error TEXT NOT NULL,
  created_at TEXT DEFAULT (datetime('now')));
CREATE INDEX idx_dead_letter_from ON dead_letter_queue(from_agent);
CREATE INDEX idx_dead_letter_to ON dead_letter_queue(to_agent);
CREATE TABLE audit_log (id INTEGER PRIMARY KEY AUTOINCREMENT, agent_id TEXT NOT NULL REFERENCES agents(id),
  event_type TEXT NOT NULL, detail TEXT NOT NULL, created_at TEXT DEFAULT (datetime('now')));
CREATE INDEX idx_audit_log_agent ON audit_log(agent_id);
CREATE INDEX idx_audit_log_type ON audit_log(event_type);
CREATE TABLE seen_messages (session_id TEXT NOT NULL, message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
  seen_at INTEGER NOT NULL DEFAULT (unixepoch()), PRIMARY KEY (session_id, message_id));
CREATE INDEX idx_seen_messages_session ON seen_messages(session_id);
