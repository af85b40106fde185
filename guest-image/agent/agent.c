/*
 * microvm-agent: the guest side of pytest-microvm.
 *
 * Runs as PID 1 in the guest image (mounts, module loading, reaping, power-off) or as
 * an ordinary host process connected to a Unix socket (so tests can drive it without
 * a VM). Either way it connects to the host, says HELLO, and then runs jobs (EXEC,
 * PUT, GET) as docs/protocol.md describes. That document is the contract; this file
 * follows it and nothing else.
 *
 * Design: one thread, one poll() loop, fixed-size buffers. Memory is bounded by
 * construction: the input buffer holds one maximal frame, the output buffer stops
 * taking job output at a high-water mark, and per-job credit stops reading a job's
 * pipes when the host is not consuming.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>

#ifndef AGENT_VERSION
#define AGENT_VERSION "0.2.0"
#endif
#define PROTO_VERSION 4

#define HDR 12u
#define MAX_PAYLOAD (1u << 20)
#define CHUNK (64u * 1024)
#define MAX_JOBS 64
#define MAX_ARGS 4096
#define MAX_USER 255   /* EXEC's user field */
#define MAX_GROUPS 64  /* supplementary groups of a user; more are not kept */
#define OUTPUT_WINDOW (256u * 1024)
#define STDIN_WINDOW (256u * 1024)
/* Job output is read only while the output buffer is below OUT_HIGH; control frames
 * (EXIT, CREDIT, ERROR) may go beyond it up to OUT_CAP. The connection is not read
 * while the buffer is above OUT_HIGH either, so a host that does not read cannot make
 * us queue replies without bound. */
#define OUT_HIGH (1u << 20)
#define OUT_CAP (OUT_HIGH + 256u * 1024)

enum {
	T_HELLO = 1, T_HELLO_ACK, T_EXEC, T_STDIN, T_STDOUT, T_STDERR, T_EXIT,
	T_KILL, T_CREDIT, T_PUT, T_GET, T_ERROR, T_POWEROFF, T_WINSIZE, T_CLONE,
};
#define MAX_ENTROPY 512u
#define EXEC_STDIN_PIPE 1u
#define EXEC_PTY 2u
#define EXIT_TIMED_OUT 1u

enum kind { K_EXEC = 1, K_PUT, K_GET };

struct job {
	uint32_t id;       /* 0 = free slot */
	enum kind kind;
	pid_t pid;         /* EXEC only; its process group id too */
	int exited, status;
	int in_fd, out_fd, err_fd;
	uint32_t out_credit;
	unsigned char *inq; /* STDIN bytes not yet written, at most STDIN_WINDOW */
	size_t inq_off, inq_len;
	int in_open;       /* host may still send STDIN */
	int timed_out;
	int pty;           /* out_fd is a pseudo-terminal master; in_fd a dup of it */
	uint64_t deadline_ms;
};

static struct {
	int pid1;
	int once;
	const char *unix_path;
	unsigned cid, port;
	int port_is_cid; /* microvm.port=cid: the host listens on the port numbered as our CID */
	char token[256];
} cfg = { .cid = 2, .port = 1024 };

static int conn = -1;
static int handshaken;
static unsigned char inbuf[HDR + MAX_PAYLOAD];
static size_t in_len;
static unsigned char outbuf[OUT_CAP];
static size_t out_len;
static struct job jobs[MAX_JOBS];
static int sigfd = -1;
static int poweroff_requested;
static int ever_connected; /* for --once: exit when the first connection ends */

/* ---- small helpers ---------------------------------------------------------- */

static void say(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "microvm-agent: ");
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static uint64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static void put32(unsigned char *p, uint32_t v)
{
	p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static void put16(unsigned char *p, uint16_t v)
{
	p[0] = v >> 8; p[1] = v;
}

static uint32_t get32(const unsigned char *p)
{
	return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static uint16_t get16(const unsigned char *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static void set_nonblock(int fd)
{
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* ---- outgoing frames -------------------------------------------------------- */

/* Reserve room for one frame in the output buffer and write its header. Returns the
 * payload pointer, or NULL when even OUT_CAP is exhausted (then the host is not
 * reading at all; dropping the connection is the only bounded answer). */
static unsigned char *frame_begin(uint16_t type, uint32_t id, uint32_t len)
{
	if (conn < 0 || out_len + HDR + len > OUT_CAP)
		return NULL;
	unsigned char *h = outbuf + out_len;
	put32(h, len);
	put16(h + 4, type);
	put16(h + 6, 0);
	put32(h + 8, id);
	out_len += HDR + len;
	return h + HDR;
}

static void send_u32s(uint16_t type, uint32_t id, int n, const uint32_t *v)
{
	unsigned char *p = frame_begin(type, id, 4u * n);
	for (int i = 0; p && i < n; i++)
		put32(p + 4 * i, v[i]);
}

static void send_error(uint32_t id, uint32_t code, const char *fmt, ...)
{
	char msg[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof msg)
		n = sizeof msg - 1;
	unsigned char *p = frame_begin(T_ERROR, id, 8u + n);
	if (!p)
		return;
	put32(p, code);
	put32(p + 4, n);
	memcpy(p + 8, msg, n);
}

static void send_hello(void)
{
	size_t vl = strlen(AGENT_VERSION), tl = strlen(cfg.token);
	unsigned char *p = frame_begin(T_HELLO, 0, 4 + 4 + vl + 4 + tl);
	if (!p)
		return;
	put16(p, PROTO_VERSION);
	put16(p + 2, 0);
	put32(p + 4, vl);
	memcpy(p + 8, AGENT_VERSION, vl);
	put32(p + 8 + vl, tl);
	memcpy(p + 12 + vl, cfg.token, tl);
}

/* ---- jobs ------------------------------------------------------------------- */

static struct job *job_find(uint32_t id)
{
	for (int i = 0; i < MAX_JOBS; i++)
		if (jobs[i].id == id)
			return &jobs[i];
	return NULL;
}

static void close_fd(int *fd)
{
	if (*fd >= 0)
		close(*fd);
	*fd = -1;
}

static void close_fds(const int *fds, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (fds[i] >= 0)
			close(fds[i]);
}

static void job_free(struct job *j)
{
	close_fd(&j->in_fd);
	close_fd(&j->out_fd);
	close_fd(&j->err_fd);
	free(j->inq);
	memset(j, 0, sizeof *j);
	j->in_fd = j->out_fd = j->err_fd = -1;
}

static void job_fail(struct job *j, int err, const char *what)
{
	send_error(j->id, (uint32_t)err, "%s: %s", what, strerror(err));
	if (j->kind == K_EXEC && j->pid > 0 && !j->exited)
		kill(-j->pid, SIGKILL); /* reaped later by the SIGCHLD loop */
	job_free(j);
}

static struct job *job_new(uint32_t id, enum kind kind)
{
	struct job *free_slot = NULL;
	for (int i = 0; i < MAX_JOBS; i++)
		if (!jobs[i].id && !free_slot)
			free_slot = &jobs[i];
	if (!free_slot) {
		send_error(id, EAGAIN, "too many jobs (at most %d at once)", MAX_JOBS);
		return NULL;
	}
	free_slot->id = id;
	free_slot->kind = kind;
	free_slot->out_credit = OUTPUT_WINDOW;
	return free_slot;
}

static void kill_all_jobs(void)
{
	for (int i = 0; i < MAX_JOBS; i++) {
		struct job *j = &jobs[i];
		if (!j->id)
			continue;
		if (j->kind == K_EXEC && j->pid > 0)
			kill(-j->pid, SIGKILL);
		job_free(j);
	}
}

/* Append STDIN bytes to the job's queue; the host's credit bounds it. */
static int job_queue_stdin(struct job *j, const unsigned char *d, uint32_t n)
{
	if (j->in_fd < 0) {
		/* The reader is gone (EPIPE) or the job is a GET: credit and drop. */
		uint32_t c = n;
		send_u32s(T_CREDIT, j->id, 1, &c);
		return 0;
	}
	if (!j->inq) {
		j->inq = malloc(STDIN_WINDOW);
		if (!j->inq)
			return -1;
	}
	if (j->inq_len + n > STDIN_WINDOW)
		return -1;
	if (j->inq_off + j->inq_len + n > STDIN_WINDOW) {
		memmove(j->inq, j->inq + j->inq_off, j->inq_len);
		j->inq_off = 0;
	}
	memcpy(j->inq + j->inq_off + j->inq_len, d, n);
	j->inq_len += n;
	return 0;
}

static void job_finish_if_done(struct job *j)
{
	if (j->kind == K_EXEC) {
		/* End of input reached the command once the queue drained. */
		if (!j->in_open && !j->inq_len)
			close_fd(&j->in_fd);
		if (!j->exited || j->out_fd >= 0 || j->err_fd >= 0)
			return;
		uint32_t v[3];
		int st = j->status;
		v[0] = WIFEXITED(st) ? (uint32_t)WEXITSTATUS(st) : (uint32_t)-1;
		v[1] = WIFSIGNALED(st) ? (uint32_t)WTERMSIG(st) : 0;
		v[2] = j->timed_out ? EXIT_TIMED_OUT : 0;
		send_u32s(T_EXIT, j->id, 3, v);
		job_free(j);
	} else if (j->kind == K_PUT) {
		if (j->in_open || j->inq_len)
			return;
		if (close(j->in_fd) < 0) {
			j->in_fd = -1;
			job_fail(j, errno, "close");
			return;
		}
		j->in_fd = -1;
		uint32_t v[3] = { 0, 0, 0 };
		send_u32s(T_EXIT, j->id, 3, v);
		job_free(j);
	} else if (j->out_fd < 0) { /* K_GET: EOF reached */
		uint32_t v[3] = { 0, 0, 0 };
		send_u32s(T_EXIT, j->id, 3, v);
		job_free(j);
	}
}

/* ---- payload parsing (strict: anything off is a malformed frame) ------------ */

struct cursor {
	const unsigned char *p;
	uint32_t left;
	const char *err;
};

static uint32_t cur_u32(struct cursor *c)
{
	if (c->err)
		return 0;
	if (c->left < 4) {
		c->err = "payload too short";
		return 0;
	}
	uint32_t v = get32(c->p);
	c->p += 4;
	c->left -= 4;
	return v;
}

/* Returns a freshly allocated NUL-terminated copy. */
static char *cur_str(struct cursor *c)
{
	uint32_t n = cur_u32(c);
	if (c->err)
		return NULL;
	if (n > c->left) {
		c->err = "string runs past the end of the payload";
		return NULL;
	}
	if (memchr(c->p, 0, n)) {
		c->err = "string contains a NUL byte";
		return NULL;
	}
	char *s = malloc((size_t)n + 1);
	if (!s) {
		c->err = "out of memory";
		return NULL;
	}
	memcpy(s, c->p, n);
	s[n] = 0;
	c->p += n;
	c->left -= n;
	return s;
}

static void free_strv(char **v)
{
	for (char **p = v; p && *p; p++)
		free(*p);
	free(v);
}

static char **cur_strv(struct cursor *c, uint32_t *count)
{
	uint32_t n = cur_u32(c);
	if (c->err)
		return NULL;
	if (n > MAX_ARGS || n > c->left / 4) {
		c->err = "string count over the limit";
		return NULL;
	}
	char **v = calloc((size_t)n + 1, sizeof *v);
	if (!v) {
		c->err = "out of memory";
		return NULL;
	}
	for (uint32_t i = 0; i < n; i++) {
		v[i] = cur_str(c);
		if (!v[i]) {
			free_strv(v);
			return NULL;
		}
	}
	*count = n;
	return v;
}

static void cur_end(struct cursor *c)
{
	if (!c->err && c->left)
		c->err = "trailing bytes in payload";
}

/* ---- starting jobs ---------------------------------------------------------- */

/* An EXEC's user, resolved in the guest's /etc/passwd and /etc/group before the vfork
 * (the child only makes system calls). */
struct ident {
	int set;
	uid_t uid;
	gid_t gid;
	int ngroups;
	gid_t groups[MAX_GROUPS];
	char home[512]; /* "HOME=..." */
};

static int parse_id(const char *s, unsigned long *out)
{
	char *end;
	if (!*s || *s < '0' || *s > '9')
		return 0;
	errno = 0;
	*out = strtoul(s, &end, 10);
	return !*end && !errno && *out <= 0xfffffffeul;
}

/* The fields of the colon-separated line of `file` whose field `key` (0: name, 2: id)
 * equals `want`; 0 if there is none. The line is kept in `line`. */
static int find_entry(const char *file, int key, const char *want, char *line, size_t size, char *f[], int nf)
{
	FILE *fp = fopen(file, "re");
	int found = 0;
	if (!fp)
		return 0;
	while (!found && fgets(line, (int)size, fp)) {
		line[strcspn(line, "\n")] = 0;
		int n = 0;
		for (char *p = line, *q; n < nf; p = q + 1) {
			f[n++] = p;
			q = strchrnul(p, ':');
			if (!*q)
				break;
			*q = 0;
		}
		found = n == nf && !strcmp(f[key], want);
	}
	fclose(fp);
	return found;
}

/* "NAME", "UID", "NAME:GROUP" or "UID:GID" as runc reads them. Returns 0, or an errno
 * with `why` saying what was not found. */
static int resolve_user(const char *spec, struct ident *id, char *why, size_t wsize)
{
	char user[MAX_USER + 1], line[1024], *f[7], *grp;
	unsigned long n;
	snprintf(user, sizeof user, "%s", spec);
	grp = strchr(user, ':');
	if (grp)
		*grp++ = 0;
	memset(id, 0, sizeof *id);
	id->set = 1;
	snprintf(id->home, sizeof id->home, "HOME=/");
	const char *name = NULL;
	if (parse_id(user, &n)) {
		id->uid = (uid_t)n;
		if (find_entry("/etc/passwd", 2, user, line, sizeof line, f, 7)) {
			name = f[0];
			id->gid = (gid_t)strtoul(f[3], NULL, 10);
			snprintf(id->home, sizeof id->home, "HOME=%s", f[5]);
		}
	} else if (find_entry("/etc/passwd", 0, user, line, sizeof line, f, 7) && parse_id(f[2], &n)) {
		name = user;
		id->uid = (uid_t)n;
		id->gid = (gid_t)strtoul(f[3], NULL, 10);
		snprintf(id->home, sizeof id->home, "HOME=%s", f[5]);
	} else {
		snprintf(why, wsize, "user %s: no such user in /etc/passwd", user);
		return ENOENT;
	}
	char who[MAX_USER + 1];
	snprintf(who, sizeof who, "%s", name ? name : "");
	if (grp) {
		char gline[4096], *g[4];
		if (parse_id(grp, &n))
			id->gid = (gid_t)n;
		else if (find_entry("/etc/group", 0, grp, gline, sizeof gline, g, 4) && parse_id(g[2], &n))
			id->gid = (gid_t)n;
		else {
			snprintf(why, wsize, "user %s: group %s: no such group in /etc/group", spec, grp);
			return ENOENT;
		}
	}
	id->groups[id->ngroups++] = id->gid;
	FILE *fp = who[0] ? fopen("/etc/group", "re") : NULL;
	char gl[4096];
	while (fp && fgets(gl, sizeof gl, fp) && id->ngroups < MAX_GROUPS) {
		gl[strcspn(gl, "\n")] = 0;
		char *g[4] = { 0 }, *p = gl;
		for (int k = 0; k < 4 && p; k++) {
			g[k] = p;
			p = strchr(p, ':');
			if (p)
				*p++ = 0;
		}
		if (!g[3] || !parse_id(g[2], &n) || (gid_t)n == id->gid)
			continue;
		for (char *m = strtok(g[3], ","); m; m = strtok(NULL, ","))
			if (!strcmp(m, who)) {
				id->groups[id->ngroups++] = (gid_t)n;
				break;
			}
	}
	if (fp)
		fclose(fp);
	return 0;
}

static char **build_env(char **extra, uint32_t n, const char *home)
{
	const char *base[] = { "PATH=/usr/sbin:/usr/bin:/sbin:/bin", home ? home : "HOME=/root" };
	char **env = calloc(n + 3, sizeof *env);
	size_t k = 0;
	if (!env)
		return NULL;
	for (size_t b = 0; b < 2; b++) {
		size_t klen = strchr(base[b], '=') - base[b] + 1;
		int overridden = 0;
		for (uint32_t i = 0; i < n; i++)
			if (!strncmp(extra[i], base[b], klen))
				overridden = 1;
		if (!overridden)
			env[k++] = (char *)base[b];
	}
	for (uint32_t i = 0; i < n; i++)
		env[k++] = extra[i];
	return env;
}

/* Where execvp would find argv0, searched in the command's own PATH (posix_spawnp and
 * execvpe search the agent's, which as PID 1 is the kernel's minimal one). Relative
 * PATH entries are relative to the command's cwd, so they are checked there and
 * passed on as they are (the spawn changes directory before it executes). */
static int find_program(const char *argv0, char *const env[], const char *cwd, char *path, size_t size)
{
	if (strchr(argv0, '/')) {
		if ((size_t)snprintf(path, size, "%s", argv0) >= size)
			return ENAMETOOLONG;
		return 0;
	}
	const char *dirs = "/usr/sbin:/usr/bin:/sbin:/bin";
	for (char *const *e = env; *e; e++)
		if (!strncmp(*e, "PATH=", 5))
			dirs = *e + 5;
	int found_denied = 0;
	for (const char *d = dirs;; d++) {
		const char *end = strchrnul(d, ':');
		int n = end - d;
		char check[4096];
		size_t len = (size_t)snprintf(path, size, "%.*s%s%s", n, d, n ? "/" : "", argv0);
		if (len < size && (size_t)snprintf(check, sizeof check, "%s/%s", path[0] == '/' ? "" : cwd,
		    path) < sizeof check) {
			struct stat st;
			if (!stat(check, &st) && S_ISREG(st.st_mode)) {
				if (!access(check, X_OK))
					return 0;
				found_denied = 1;
			}
		}
		if (!*end)
			break;
		d = end;
	}
	return found_denied ? EACCES : ENOENT;
}

/* Start a job's process with vfork: the child borrows the agent's memory until it
 * executes, so no page tables are copied, which under TCG is most of what fork costs.
 * (posix_spawn does the same, plus a fresh stack mapping and a sigaction call for each
 * of the 64 signals in the child; measured here, that cost half a millisecond more per
 * command.) Between vfork and execve the child only makes system calls and writes
 * child_errno: the agent has no signal handlers that could run in it, and it never
 * returns from this function. It starts a new session; with a pty (`tty`: its slave's
 * name) it opens the terminal as stdin without O_NOCTTY, which makes it the session's
 * controlling terminal. Returns 0 or the errno of what failed (a missing program, a
 * bad cwd, ...). */
static int spawn(pid_t *pid, char *const argv[], char *const env[], const char *cwd, const char *tty,
    int in, int out, int err, const struct ident *id, const char **step)
{
	static volatile int child_errno; /* written by the child, read once it has gone */
	static const char *volatile child_step; /* what failed in it (NULL: the exec) */
	char path[4096];
	int rc = find_program(argv[0], env, cwd, path, sizeof path);
	if (rc)
		return rc;
	sigset_t none;
	sigemptyset(&none);
	child_errno = 0;
	child_step = NULL;
	pid_t p = vfork();
	if (p == 0) {
		signal(SIGPIPE, SIG_DFL); /* the only signal the agent ignores (main() resets the rest) */
		sigprocmask(SIG_SETMASK, &none, NULL);
		setsid();
		/* O_CLOEXEC: only the copy made as fd 0 reaches the command (main() keeps 0-2
		 * open, so nothing opened here can already be 0). */
		int fd0 = tty ? open(tty, O_RDWR | O_CLOEXEC) : in >= 0 ? in : open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (fd0 >= 0 && dup2(fd0, 0) >= 0 && dup2(out, 1) >= 0 && dup2(err, 2) >= 0) {
			/* The user first, then the cwd: the directory is checked with the user's rights. */
			if (id->set && setgroups((size_t)id->ngroups, id->groups) < 0)
				child_step = "setgroups";
			else if (id->set && setgid(id->gid) < 0)
				child_step = "setgid";
			else if (id->set && setuid(id->uid) < 0)
				child_step = "setuid";
			else if (chdir(cwd) < 0)
				child_step = "chdir";
			else
				execve(path, argv, env);
		}
		child_errno = errno;
		_exit(127);
	}
	if (p < 0)
		return errno;
	if (child_errno) { /* it never ran the command: reap it here, not as a job */
		while (waitpid(p, NULL, 0) < 0 && errno == EINTR)
			;
		*step = child_step;
		return child_errno;
	}
	*pid = p;
	return 0;
}

static void start_exec(uint32_t id, struct cursor *c)
{
	uint32_t flags = cur_u32(c), timeout = cur_u32(c), argc = 0, envc = 0;
	if (!c->err && (flags & ~(EXEC_STDIN_PIPE | EXEC_PTY)))
		c->err = "unknown exec flag";
	if (!c->err && (flags & EXEC_PTY) && !(flags & EXEC_STDIN_PIPE))
		c->err = "PTY without STDIN_PIPE";
	char *cwd = cur_str(c);
	char **argv = cur_strv(c, &argc);
	char **envv = argv ? cur_strv(c, &envc) : NULL;
	char *user = envv ? cur_str(c) : NULL;
	uint32_t size = (flags & EXEC_PTY) ? cur_u32(c) : 0; /* u16 rows, u16 cols */
	cur_end(c);
	if (!c->err && argc == 0)
		c->err = "EXEC without argv";
	if (!c->err && user && strlen(user) > MAX_USER)
		c->err = "EXEC user too long";
	if (c->err)
		goto out;

	struct job *j = job_new(id, K_EXEC);
	if (!j)
		goto out;
	struct ident ident = { 0 };
	if (user[0]) {
		char why[2 * MAX_USER + 64];
		int e = resolve_user(user, &ident, why, sizeof why);
		if (e) {
			send_error(j->id, (uint32_t)e, "%s", why);
			job_free(j);
			goto out;
		}
	}
	int has_home = 0;
	for (uint32_t i = 0; i < envc; i++)
		has_home |= !strncmp(envv[i], "HOME=", 5);
	char **env = build_env(envv, envc, ident.set && !has_home ? ident.home : NULL);
	int in[2] = { -1, -1 }, out[2] = { -1, -1 }, err[2] = { -1, -1 };
	int master = -1;
	char pts[64] = "";
	if (!env) {
		job_fail(j, ENOMEM, "environment");
		goto out;
	}
	if (flags & EXEC_PTY) {
		/* One terminal for all three streams: the slave side goes to the child as
		 * in[0]/out[1]/err[1]; the master is read as stdout and written as stdin. */
		master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
		char *name = master >= 0 && !grantpt(master) && !unlockpt(master) ? ptsname(master) : NULL;
		if (name && strlen(name) >= sizeof pts) {
			errno = ENAMETOOLONG; /* cannot happen with /dev/pts/N, but never truncate a path */
			name = NULL;
		}
		int slave = name ? open(name, O_RDWR | O_NOCTTY | O_CLOEXEC) : -1;
		if (slave < 0) {
			int e = errno;
			if (master >= 0)
				close(master);
			free(env);
			job_fail(j, e, "openpty");
			goto out;
		}
		strcpy(pts, name);
		/* The size is set before the command starts: one that asks at once sees it. */
		struct winsize ws = { .ws_row = (unsigned short)(size >> 16), .ws_col = (unsigned short)(size & 0xffff) };
		ioctl(master, TIOCSWINSZ, &ws);
		in[0] = slave;
		out[1] = fcntl(slave, F_DUPFD_CLOEXEC, 3);
		err[1] = fcntl(slave, F_DUPFD_CLOEXEC, 3);
		out[0] = master;
		in[1] = fcntl(master, F_DUPFD_CLOEXEC, 3);
		if (out[1] < 0 || err[1] < 0 || in[1] < 0) {
			int e = errno;
			close_fds((int[]){ in[0], in[1], out[0], out[1], err[0], err[1] }, 6);
			free(env);
			job_fail(j, e, "pty");
			goto out;
		}
	} else if (pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC) ||
	    ((flags & EXEC_STDIN_PIPE) && pipe2(in, O_CLOEXEC))) {
		int e = errno;
		close_fds((int[]){ in[0], in[1], out[0], out[1], err[0], err[1] }, 6);
		free(env);
		job_fail(j, e, "pipe");
		goto out;
	}
	pid_t pid = -1;
	const char *step = NULL;
	const char *dir = cwd[0] ? cwd : "/";
	int spawn_errno = spawn(&pid, argv, env, dir, pts[0] ? pts : NULL, in[0], out[1], err[1], &ident, &step);
	free(env);
	close(out[1]);
	close(err[1]);
	if (in[0] >= 0)
		close(in[0]);
	j->out_fd = out[0];
	j->err_fd = err[0]; /* -1 with a PTY: everything comes through the master */
	j->in_fd = in[1];
	j->pty = (flags & EXEC_PTY) != 0;
	j->in_open = in[1] >= 0;
	if (spawn_errno) {
		char what[MAX_USER + 4200];
		int in_dir = step && !strcmp(step, "chdir");
		if (step && user[0])
			snprintf(what, sizeof what, "user %s: %s%s%s", user, step, in_dir ? " " : "", in_dir ? dir : "");
		else if (step) /* chdir: the only step without a user */
			snprintf(what, sizeof what, "%s %s", step, dir);
		else
			snprintf(what, sizeof what, "%s", argv[0]);
		job_fail(j, spawn_errno, what);
		goto out;
	}
	j->pid = pid;
	set_nonblock(j->out_fd);
	set_nonblock(j->err_fd);
	if (j->in_fd >= 0)
		set_nonblock(j->in_fd);
	if (timeout)
		j->deadline_ms = now_ms() + timeout;
out:
	free(cwd);
	free(user);
	free_strv(argv);
	free_strv(envv);
}

static void start_file_job(uint32_t id, int type, struct cursor *c)
{
	uint32_t mode = type == T_PUT ? cur_u32(c) : 0;
	char *path = cur_str(c);
	cur_end(c);
	if (c->err) {
		free(path);
		return;
	}
	struct job *j = job_new(id, type == T_PUT ? K_PUT : K_GET);
	if (j) {
		int fd = type == T_PUT
			? open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode & 07777)
			: open(path, O_RDONLY | O_CLOEXEC);
		struct stat st;
		if (fd >= 0 && type == T_GET && fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
			close(fd);
			fd = -1;
			errno = EISDIR;
		}
		if (fd < 0) {
			job_fail(j, errno, path);
		} else if (type == T_PUT) {
			j->in_fd = fd;
			j->in_open = 1;
		} else {
			j->out_fd = fd;
		}
	}
	free(path);
}

/* ---- incoming frames -------------------------------------------------------- */

static void drop_connection(void)
{
	kill_all_jobs();
	close_fd(&conn);
	in_len = out_len = 0;
	handshaken = 0;
}

/* Send what is queued (the last frame an ERROR), waiting at most a second: a host
 * that does not read must not hold the agent. Then drop the connection. */
static void drop_connection_after_flush(void)
{
	uint64_t deadline = now_ms() + 1000;
	size_t done = 0;
	while (done < out_len && now_ms() < deadline) {
		struct pollfd p = { conn, POLLOUT, 0 };
		if (poll(&p, 1, 100) <= 0)
			continue;
		ssize_t w = send(conn, outbuf + done, out_len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w < 0 && errno != EAGAIN && errno != EINTR)
			break;
		if (w > 0)
			done += (size_t)w;
	}
	drop_connection();
}

/* CLONE: this guest was restored from a snapshot that other guests share. Make what
 * must differ between them our own: the wall clock, the kernel RNG (host entropy mixed
 * in, then an immediate reseed, so no two clones draw the same bytes), and the token.
 * A step that fails ends the connection with an ERROR: a clone that still shares the
 * template's identity must not pass the probe. */
static const char *become_clone(struct cursor *c)
{
	uint32_t hi = cur_u32(c), lo = cur_u32(c), nsec = cur_u32(c);
	char *token = cur_str(c);
	uint32_t n = cur_u32(c);
	if (!c->err && n > c->left)
		c->err = "CLONE entropy runs past the end of the payload";
	if (!c->err && (n < 16 || n > MAX_ENTROPY))
		c->err = "CLONE entropy not between 16 and 512 bytes";
	const unsigned char *entropy = c->p;
	if (!c->err) {
		c->p += n;
		c->left -= n;
	}
	cur_end(c);
	if (!c->err && (nsec >= 1000000000u || !token[0] || strlen(token) >= sizeof cfg.token))
		c->err = "CLONE with a bad time or token";
	if (c->err) {
		free(token);
		return c->err;
	}
	struct timespec ts = { (time_t)(((uint64_t)hi << 32) | lo), (long)nsec };
	const char *step = "setting the clock";
	/* Only in a guest: an agent on the host (tests) must never set the host's clock. */
	errno = EPERM;
	int ok = cfg.pid1 && clock_settime(CLOCK_REALTIME, &ts) == 0;
	if (ok) {
		step = "reseeding the RNG";
		/* rand_pool_info ends in a flexible array: room for it in a union (ISO C). */
		union { struct rand_pool_info info; unsigned char raw[sizeof(struct rand_pool_info) + MAX_ENTROPY]; } pool;
		pool.info.entropy_count = (int)(8 * n);
		pool.info.buf_size = (int)n;
		memcpy(pool.info.buf, entropy, n);
		int fd = open("/dev/urandom", O_RDWR | O_CLOEXEC);
		ok = fd >= 0 && ioctl(fd, RNDADDENTROPY, &pool.info) == 0 && ioctl(fd, RNDRESEEDCRNG) == 0;
		int e = errno;
		if (fd >= 0)
			close(fd);
		errno = e;
	}
	if (!ok) {
		send_error(0, (uint32_t)errno, "CLONE: %s failed: %s", step, strerror(errno));
		free(token);
		drop_connection_after_flush();
		return NULL;
	}
	snprintf(cfg.token, sizeof cfg.token, "%s", token);
	free(token);
	say("cloned: clock set, RNG reseeded, new token");
	return NULL;
}

/* Handle one complete frame. Returns NULL, or what made it malformed. */
static const char *handle_frame(uint16_t type, uint32_t id, const unsigned char *p, uint32_t len)
{
	struct cursor c = { p, len, NULL };
	int job_frame = type == T_EXEC || type == T_STDIN || type == T_KILL ||
			type == T_CREDIT || type == T_PUT || type == T_GET || type == T_WINSIZE;

	if (type == T_HELLO || type == T_STDOUT || type == T_STDERR || type == T_EXIT)
		return "misdirected frame type (agent-to-host only)";
	if (!handshaken) {
		if (type != T_HELLO_ACK)
			return "frame before the handshake ended";
		if (id)
			return "HELLO_ACK with a non-zero id";
		if (len != 4 || get16(p) != PROTO_VERSION || get16(p + 2))
			return "bad HELLO_ACK";
		handshaken = 1;
		return NULL;
	}
	if (job_frame && !id)
		return "job frame with id 0";
	if (!job_frame && type != T_ERROR && id)
		return "connection frame with a job id";

	struct job *j = job_frame ? job_find(id) : NULL;
	switch (type) {
	case T_EXEC:
	case T_PUT:
	case T_GET:
		if (j)
			return "id already in use";
		if (type == T_EXEC)
			start_exec(id, &c);
		else
			start_file_job(id, type, &c);
		return c.err;
	case T_STDIN:
		if (!j)
			return NULL; /* raced with the job's end */
		if (!j->in_open)
			return "STDIN for a job that takes no (more) input";
		if (len == 0) {
			j->in_open = 0;
			return NULL;
		}
		return job_queue_stdin(j, p, len) ? "STDIN beyond the credit" : NULL;
	case T_KILL: {
		uint32_t sig = cur_u32(&c);
		cur_end(&c);
		if (c.err)
			return c.err;
		if (sig < 1 || sig > 64)
			return "KILL with an invalid signal";
		if (j && j->kind == K_EXEC && j->pid > 0)
			kill(-j->pid, (int)sig);
		return NULL;
	}
	case T_CREDIT: {
		uint32_t n = cur_u32(&c);
		cur_end(&c);
		if (c.err)
			return c.err;
		if (j && (uint64_t)j->out_credit + n > OUTPUT_WINDOW)
			return "CREDIT above the window";
		if (j)
			j->out_credit += n;
		return NULL;
	}
	case T_ERROR:
		say("host reported an error, reconnecting");
		drop_connection();
		return NULL;
	case T_HELLO_ACK:
		return "HELLO_ACK after the handshake";
	case T_WINSIZE: {
		if (len != 4)
			return "WINSIZE payload is not 4 bytes";
		if (j && !j->pty)
			return "WINSIZE for a job without a terminal";
		struct winsize ws = { .ws_row = get16(p), .ws_col = get16(p + 2) };
		if (j && j->out_fd >= 0)
			ioctl(j->out_fd, TIOCSWINSZ, &ws); /* the kernel sends SIGWINCH */
		return NULL;
	}
	case T_POWEROFF:
		if (len)
			return "POWEROFF with a payload";
		poweroff_requested = 1;
		return NULL;
	case T_CLONE:
		return become_clone(&c);
	default:
		return "unknown or misdirected frame type";
	}
}

static void malformed(const char *why)
{
	say("malformed frame from host: %s; closing the connection", why);
	kill_all_jobs();
	/* Whatever is queued stays: the buffer may end in a half-sent frame, and cutting
	 * it would corrupt the stream. The error goes after it. */
	send_error(0, EPROTO, "malformed frame: %s", why);
	drop_connection_after_flush();
}

static void read_conn(void)
{
	ssize_t r = recv(conn, inbuf + in_len, sizeof inbuf - in_len, 0);
	if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
		say("connection closed by host");
		drop_connection();
		return;
	}
	if (r < 0)
		return;
	in_len += (size_t)r;
	size_t off = 0;
	while (conn >= 0 && in_len - off >= HDR) {
		const unsigned char *h = inbuf + off;
		uint32_t len = get32(h);
		uint16_t type = get16(h + 4);
		/* Judge the header before waiting for the payload: an oversized length
		 * must never turn into an allocation or a stall. */
		if (len > MAX_PAYLOAD)
			return malformed("frame larger than MAX_PAYLOAD");
		if (get16(h + 6))
			return malformed("non-zero header flags");
		if (type < T_HELLO || type > T_CLONE)
			return malformed("unknown frame type");
		if (in_len - off < HDR + len)
			break;
		const char *why = handle_frame(type, get32(h + 8), h + HDR, len);
		if (why)
			return malformed(why);
		off += HDR + len;
	}
	if (conn >= 0) {
		memmove(inbuf, inbuf + off, in_len - off);
		in_len -= off;
	}
}

static void flush_out(void)
{
	size_t done = 0;
	while (done < out_len) {
		ssize_t w = send(conn, outbuf + done, out_len - done, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (w < 0) {
			if (errno == EAGAIN || errno == EINTR)
				break;
			say("send failed: %s", strerror(errno));
			drop_connection();
			return;
		}
		done += (size_t)w;
	}
	memmove(outbuf, outbuf + done, out_len - done);
	out_len -= done;
}

/* ---- job I/O ---------------------------------------------------------------- */

static void pump_output(struct job *j, int *fd, uint16_t type)
{
	uint32_t room = CHUNK;
	if (room > j->out_credit)
		room = j->out_credit;
	if (!room || out_len + HDR + CHUNK > OUT_HIGH)
		return;
	unsigned char *p = outbuf + out_len + HDR;
	ssize_t r = read(*fd, p, room);
	if (r < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (r < 0 && j->kind == K_GET) {
		job_fail(j, errno, "read");
		return;
	}
	if (r <= 0) {
		close_fd(fd);
		return;
	}
	frame_begin(type, j->id, (uint32_t)r);
	j->out_credit -= (uint32_t)r;
}

static void pump_stdin(struct job *j)
{
	ssize_t w = write(j->in_fd, j->inq + j->inq_off, j->inq_len);
	if (w < 0 && (errno == EAGAIN || errno == EINTR))
		return;
	if (w < 0) {
		if (j->kind == K_PUT) {
			job_fail(j, errno, "write");
			return;
		}
		/* The command closed its stdin: what is queued will never be read. */
		w = (ssize_t)j->inq_len;
		close_fd(&j->in_fd);
	}
	uint32_t n = (uint32_t)w;
	send_u32s(T_CREDIT, j->id, 1, &n);
	j->inq_off += n;
	j->inq_len -= n;
	if (!j->inq_len)
		j->inq_off = 0;
}

static void reap(void)
{
	struct signalfd_siginfo si;
	while (read(sigfd, &si, sizeof si) == sizeof si)
		;
	int st;
	pid_t pid;
	while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
		for (int i = 0; i < MAX_JOBS; i++) {
			struct job *j = &jobs[i];
			if (j->id && j->kind == K_EXEC && j->pid == pid) {
				j->exited = 1;
				j->status = st;
				close_fd(&j->in_fd);
				j->inq_len = 0;
			}
		}
	}
}

/* ---- connecting ------------------------------------------------------------- */

/* A vsock stream's buffer is 256 KiB by default, and a Linux receiver returns credit
 * only after most of it is consumed: the sender then idles while the update travels.
 * A larger buffer keeps the pipe full (the agent's own connection and the tools). */
static void vsock_buffer(int fd)
{
	unsigned long long size = 4ull << 20;
	setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_BUFFER_MAX_SIZE, &size, sizeof size);
	setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_BUFFER_SIZE, &size, sizeof size);
}

/* This guest's vsock CID (the host's vhost-vsock device gives it; a snapshot clone is
 * given a new one, which the guest driver rereads on the transport reset that follows
 * the restore). VMADDR_CID_ANY when it cannot be read. */
static unsigned local_cid(void)
{
	static int fd = -1;
	unsigned cid = VMADDR_CID_ANY;
	if (fd < 0)
		fd = open("/dev/vsock", O_RDONLY | O_CLOEXEC);
	if (fd >= 0 && ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, &cid) < 0)
		cid = VMADDR_CID_ANY;
	return cid;
}

/* connect() that gives up as soon as the guest's CID changes. A guest saved while it was
 * connecting (a snapshot template in its reconnect loop) resumes in a clone with a new CID,
 * and the request it sent under the old one is dropped by the host: waiting for the
 * kernel's 2 s connect timeout then held every clone back by 2 s. A slow host is waited
 * for as before (the timeout is the kernel's). The socket is left blocking on success. */
static int await_connect(int fd, const struct sockaddr *a, socklen_t len, unsigned cid)
{
	if (connect(fd, a, len) == 0)
		goto connected;
	if (errno != EINPROGRESS)
		return -1;
	for (;;) {
		struct pollfd p = { fd, POLLOUT, 0 };
		int n = poll(&p, 1, 10);
		if (n < 0 && errno != EINTR)
			return -1;
		if (n > 0) {
			int err = 0;
			socklen_t elen = sizeof err;
			if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
				return -1;
			if (err) {
				errno = err;
				return -1;
			}
			goto connected;
		}
		if (local_cid() != cid) {
			errno = ECONNRESET; /* restored with a new CID: start again under it */
			return -1;
		}
	}
connected:
	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
	return 0;
}

static int try_connect(void)
{
	int fd;
	if (cfg.unix_path) {
		struct sockaddr_un a = { .sun_family = AF_UNIX };
		if (strlen(cfg.unix_path) >= sizeof a.sun_path) {
			errno = ENAMETOOLONG;
			return -1;
		}
		strcpy(a.sun_path, cfg.unix_path);
		fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0)
			return fd;
	} else {
		unsigned cid = local_cid(); /* asked each time: a restored clone has a new one */
		struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = cfg.cid,
					 .svm_port = cfg.port_is_cid ? cid : cfg.port };
		fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
		if (fd >= 0) {
			vsock_buffer(fd);
			if (await_connect(fd, (struct sockaddr *)&a, sizeof a, cid) == 0)
				return fd;
		}
	}
	int e = errno;
	if (fd >= 0)
		close(fd);
	errno = e;
	return -1;
}

/* Retry every 10 ms, never slower: a guest restored from a snapshot sits in this loop
 * until its vsock device is plugged in, and must connect the moment it is. A refused
 * connect costs the guest microseconds. */
static void connect_with_backoff(void)
{
	unsigned attempt = 0;
	for (;;) {
		conn = try_connect();
		if (conn >= 0)
			break;
		if (attempt % 1000 == 0) /* every ten seconds */
			say("connecting to %s failed (%s); retrying",
			    cfg.unix_path ? cfg.unix_path : "vsock host", strerror(errno));
		attempt++;
		if (cfg.once && attempt > 6000)
			exit(1);
		unsigned delay_ms = attempt < 2 ? 5 : 10;
		struct timespec ts = { 0, (long)delay_ms * 1000000L };
		nanosleep(&ts, NULL);
		reap(); /* orphans keep dying while we wait */
	}
	set_nonblock(conn);
	say("connected");
	send_hello();
}

/* ---- PID 1 duties ----------------------------------------------------------- */

#define P9_OPTS "trans=virtio,version=9p2000.L,msize=524288"

static int write_all(int fd, const char *p, size_t n);

static void load_module_list(const char *list)
{
	FILE *f = fopen(list, "r");
	char line[512];
	while (f && fgets(line, sizeof line, f)) {
		line[strcspn(line, "\r\n")] = 0;
		if (!line[0] || line[0] == '#')
			continue;
		int fd = open(line, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST))
			say("loading module %s failed: %s", line, strerror(errno));
		else
			say("loaded module %s", strrchr(line, '/') ? strrchr(line, '/') + 1 : line);
		if (fd >= 0)
			close(fd);
	}
	if (f)
		fclose(f);
}

/* mkdir -p; existing directories are fine. */
static int mkdirs(const char *path, mode_t mode)
{
	char buf[4096];
	if ((size_t)snprintf(buf, sizeof buf, "%s", path) >= sizeof buf) {
		errno = ENAMETOOLONG;
		return -1;
	}
	for (char *p = buf + 1;; p++) {
		if (*p == '/' || !*p) {
			char c = *p;
			*p = 0;
			if (mkdir(buf, mode) < 0 && errno != EEXIST)
				return -1;
			*p = c;
			if (!c)
				return 0;
		}
	}
}

/* A root-disk driver may still be probing when its module returns, and a disk node
 * appears in devtmpfs a moment later: retry for up to two seconds. */
static int mount_retry(const char *src, const char *dst, const char *type, unsigned long flags, const char *opts)
{
	for (int i = 0;; i++) {
		if (mount(src, dst, type, flags, opts) == 0)
			return 0;
		if ((errno != ENOENT && errno != ENXIO) || i >= 200)
			return -1;
		struct timespec ts = { 0, 10 * 1000000L };
		nanosleep(&ts, NULL);
	}
}

static int copy_file(const char *from, const char *to, mode_t mode)
{
	/* A fresh file: whatever the root has there (a symlink, which would resolve in the
	 * initramfs, possibly to /init itself) is replaced, never written through. */
	if (unlink(to) < 0 && errno != ENOENT)
		return -1;
	int in = open(from, O_RDONLY | O_CLOEXEC);
	int out = in < 0 ? -1 : open(to, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
	char buf[65536];
	ssize_t n = 0;
	while (out >= 0 && (n = read(in, buf, sizeof buf)) > 0)
		if (write_all(out, buf, (size_t)n) < 0) {
			n = -1;
			break;
		}
	int e = errno;
	if (in >= 0)
		close(in);
	if (out >= 0)
		close(out);
	errno = e;
	return in < 0 || out < 0 || n < 0 ? -1 : 0;
}

__attribute__((noreturn)) static void fatal_boot(const char *fmt, const char *arg)
{
	const char *why = strerror(errno);
	fprintf(stderr, "microvm-agent: FATAL: ");
	fprintf(stderr, fmt, arg, why);
	fprintf(stderr, "; powering off\n");
	sync();
	reboot(RB_POWER_OFF);
	reboot(RB_AUTOBOOT);
	for (;;)
		pause();
}

/* Switch to the guest's own root (docs/protocol.md, "Guest root"): the read-only lower
 * layer (an EROFS disk, or a 9p share of the host's /) under a tmpfs overlay, so
 * commands may write anywhere and nothing reaches the lower layer. The agent moves the
 * API file systems into it, copies itself in as /usr/bin/microvm-agent (the tool modes
 * must exist in every root), and makes it the root as switch_root does. */
static void switch_root(const char *root)
{
	const char *lower = "/mnt/lower", *rw = "/mnt/rw", *top = "/mnt/root";
	mkdirs(lower, 0755);
	mkdirs(rw, 0755);
	mkdirs(top, 0755);
	if (!strcmp(root, "erofs")) {
		if (mount_retry("/dev/vda", lower, "erofs", MS_RDONLY, NULL) < 0)
			fatal_boot("mounting the root disk /dev/vda (%s) as EROFS failed: %s", "erofs");
	} else if (!strncmp(root, "9p:", 3)) {
		if (mount_retry(root + 3, lower, "9p", MS_RDONLY, P9_OPTS ",cache=mmap") < 0)
			fatal_boot("mounting the 9p root share %s failed: %s", root + 3);
	} else {
		errno = EINVAL;
		fatal_boot("unknown microvm.root=%s: %s", root);
	}
	if (mount("tmpfs", rw, "tmpfs", 0, "mode=0755") < 0 || mkdirs("/mnt/rw/upper", 0755) < 0 ||
	    mkdirs("/mnt/rw/work", 0755) < 0)
		fatal_boot("the overlay's tmpfs (%s): %s", rw);
	if (mount("overlay", top, "overlay", 0,
		  "lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work") < 0)
		fatal_boot("mounting the overlay on %s failed: %s", top);
	static const char *const moved[] = { "/proc", "/sys", "/dev" };
	char path[64];
	for (size_t i = 0; i < sizeof moved / sizeof *moved; i++) {
		snprintf(path, sizeof path, "%s%s", top, moved[i]);
		if (mkdirs(path, 0755) < 0 || mount(moved[i], path, NULL, MS_MOVE, NULL) < 0)
			fatal_boot("moving %s into the new root failed: %s", moved[i]);
	}
	/* Fresh tmpfs for /tmp and /run: never the lower layer (9p's unlink-while-open
	 * fails with ENOENT, and writes there would cost a copy-up). */
	static const char *const fresh[] = { "/tmp", "/run" };
	for (size_t i = 0; i < sizeof fresh / sizeof *fresh; i++) {
		snprintf(path, sizeof path, "%s%s", top, fresh[i]);
		if (mkdirs(path, 0755) < 0 ||
		    mount("tmpfs", path, "tmpfs", 0, i == 0 ? "mode=1777" : "mode=0755") < 0)
			fatal_boot("mounting a tmpfs on %s failed: %s", fresh[i]);
	}
	if (mkdirs("/mnt/root/usr/bin", 0755) < 0 ||
	    copy_file("/init", "/mnt/root/usr/bin/microvm-agent", 0755) < 0)
		fatal_boot("copying the agent into the new root (%s) failed: %s", "/usr/bin/microvm-agent");
	if (chdir(top) < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 || chdir("/") < 0)
		fatal_boot("switching to the new root %s failed: %s", top);
	say("root is %s under a tmpfs overlay", root);
}

static void pid1_setup(void)
{
	static const struct { const char *src, *dst, *type; } m[] = {
		{ "proc", "/proc", "proc" },  { "sysfs", "/sys", "sysfs" },
		{ "devtmpfs", "/dev", "devtmpfs" }, { "devpts", "/dev/pts", "devpts" },
		{ "tmpfs", "/tmp", "tmpfs" }, { "tmpfs", "/run", "tmpfs" },
	};
	for (size_t i = 0; i < sizeof m / sizeof *m; i++) {
		mkdir(m[i].dst, 0755);
		if (mount(m[i].src, m[i].dst, m[i].type, 0, NULL) < 0 && errno != EBUSY)
			say("mount %s: %s", m[i].dst, strerror(errno));
	}
	say("%s running as PID 1", AGENT_VERSION);

	FILE *f = fopen("/proc/cmdline", "r");
	char cmd[4096] = "", root[256] = "", groups[256] = "";
	if (f) {
		if (!fgets(cmd, sizeof cmd, f))
			cmd[0] = 0;
		fclose(f);
	}
	for (char *t = strtok(cmd, " \n"); t; t = strtok(NULL, " \n")) {
		if (!strcmp(t, "microvm.port=cid"))
			cfg.port_is_cid = 1;
		else if (!strncmp(t, "microvm.port=", 13))
			cfg.port = (unsigned)strtoul(t + 13, NULL, 10);
		else if (!strncmp(t, "microvm.cid=", 12))
			cfg.cid = (unsigned)strtoul(t + 12, NULL, 10);
		else if (!strncmp(t, "microvm.token=", 14))
			snprintf(cfg.token, sizeof cfg.token, "%s", t + 14);
		else if (!strncmp(t, "microvm.root=", 13))
			snprintf(root, sizeof root, "%s", t + 13);
		else if (!strncmp(t, "microvm.modules=", 16))
			snprintf(groups, sizeof groups, "%s", t + 16);
	}

	/* The image lists its modules in load order (dependencies first): the ones every
	 * guest needs, then the groups this boot asked for (a root disk, 9p, overlay). */
	load_module_list("/etc/microvm/modules");
	for (char *g = strtok(groups, ","); g; g = strtok(NULL, ",")) {
		char list[300];
		snprintf(list, sizeof list, "/etc/microvm/modules.%s", g);
		if (access(list, R_OK) == 0)
			load_module_list(list);
	}
	if (root[0])
		switch_root(root);

	/* Loopback up, so services started in the guest can be reached from it. */
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr = { 0 };
	strcpy(ifr.ifr_name, "lo");
	if (s >= 0 && ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
		ifr.ifr_flags |= IFF_UP;
		ioctl(s, SIOCSIFFLAGS, &ifr);
	}
	if (s >= 0)
		close(s);
	sethostname("microvm", 7);
	if (cfg.port_is_cid)
		say("host is vsock %u, port: this guest's CID (%u now)", cfg.cid, local_cid());
	else
		say("host is vsock %u:%u", cfg.cid, cfg.port);
}

static void power_off(void)
{
	kill_all_jobs();
	if (!cfg.pid1) {
		say("poweroff requested; exiting");
		exit(0);
	}
	say("powering off");
	sync();
	reboot(RB_POWER_OFF);
	reboot(RB_AUTOBOOT); /* with -no-reboot, QEMU exits on this too */
	for (;;)
		pause();
}

static int usage(void)
{
	fprintf(stderr, "usage: microvm-agent [--unix PATH] [--token TOKEN] [--once]\n"
			"       microvm-agent --connect CID:PORT | --listen PORT | --echo PORT\n"
			"       microvm-agent --forward VSOCK_PORT TCP_PORT\n"
			"       microvm-agent --mount-9p TAG PATH ro|rw [TAG PATH ro|rw ...]\n"
			"  As PID 1 it reads microvm.port/cid/token from /proc/cmdline (port=cid:\n"
			"  the port numbered as the guest's own vsock CID).\n"
			"  The tool modes relay stdin/stdout over one vsock connection (--echo:\n"
			"  echo every connection back) for tests of the vsock path; --forward relays\n"
			"  each vsock connection to a TCP port on the guest's loopback; --mount-9p\n"
			"  mounts the host's 9p shares.\n");
	return 2;
}

/* ---- tool mode: a tiny socat for vsock, so tests can open guest-side connections ---- */

static int write_all(int fd, const char *p, size_t n)
{
	while (n) {
		ssize_t w = write(fd, p, n);
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -1;
		p += w;
		n -= (size_t)w;
	}
	return 0;
}

/* Copy stdin to the socket and the socket to stdout until the socket reaches EOF;
 * stdin's EOF becomes a half-close (SHUT_WR), so the peer sees the end of our data. */
static int relay(int fd, int in, int out)
{
	static char buf[CHUNK];
	int in_open = 1;
	for (;;) {
		struct pollfd p[2] = { { in, in_open ? POLLIN : 0, 0 }, { fd, POLLIN, 0 } };
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			return 1;
		}
		if (in_open && p[0].revents) {
			ssize_t n = read(in, buf, sizeof buf);
			if (n <= 0) {
				in_open = 0;
				shutdown(fd, SHUT_WR);
			} else if (write_all(fd, buf, (size_t)n) < 0) {
				return 1;
			}
		}
		if (p[1].revents) {
			ssize_t n = read(fd, buf, sizeof buf);
			if (n <= 0)
				return n < 0;
			if (write_all(out, buf, (size_t)n) < 0)
				return 1;
		}
	}
}

static int vsock_listener(unsigned port)
{
	struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
	int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd >= 0)
		vsock_buffer(fd); /* inherited by accepted connections */
	if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || listen(fd, 64) < 0) {
		say("listen on vsock port %u: %s", port, strerror(errno));
		exit(1);
	}
	return fd;
}

/* Accept connections on vsock PORT forever; a child runs handle(fd, arg) for each. */
static int serve_forever(unsigned port, int (*handle)(int fd, unsigned arg), unsigned arg)
{
	int lfd = vsock_listener(port);
	signal(SIGCHLD, SIG_IGN);
	for (;;) {
		int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (fd < 0)
			continue;
		if (fork() == 0) {
			close(lfd);
			_exit(handle(fd, arg));
		}
		close(fd);
	}
}

static int echo_connection(int fd, unsigned unused)
{
	(void)unused;
	return relay(fd, fd, fd);
}

/* --forward VPORT TCPPORT: each vsock connection to VPORT is relayed to 127.0.0.1:TCPPORT
 * in the guest, so host programs reach TCP services (sshd, a web server under test)
 * without any network device. */
static int forward_connection(int fd, unsigned tcp_port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)tcp_port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int tcp = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (tcp < 0 || connect(tcp, (struct sockaddr *)&a, sizeof a) < 0)
		return 1; /* closing the vsock side tells the host */
	return relay(fd, tcp, tcp);
}

/* --mount-9p TAG PATH ro|rw ...: mount the host's 9p shares (docs/protocol.md, "Host
 * directory shares"). The host runs this once the agent is up, so a share never needs
 * to exist at boot (and a restored snapshot mounts its shares the same way). */
static int mount_shares(int n, char **args)
{
	if (n <= 0 || n % 3)
		return usage();
	for (int i = 0; i < n; i += 3) {
		const char *tag = args[i], *path = args[i + 1], *mode = args[i + 2];
		if (path[0] != '/' || (strcmp(mode, "ro") && strcmp(mode, "rw"))) {
			say("--mount-9p %s %s %s: need an absolute path and ro or rw", tag, path, mode);
			return 2;
		}
		unsigned long flags = strcmp(mode, "ro") ? 0 : MS_RDONLY;
		if (mkdirs(path, 0755) < 0 || mount(tag, path, "9p", flags, P9_OPTS ",cache=mmap") < 0) {
			say("mounting share %s on %s failed: %s", tag, path, strerror(errno));
			return 1;
		}
	}
	return 0;
}

static int tool(const char *mode, const char *arg)
{
	signal(SIGPIPE, SIG_IGN);
	if (!strcmp(mode, "--connect")) { /* CID:PORT */
		unsigned cid, port;
		if (sscanf(arg, "%u:%u", &cid, &port) != 2)
			return usage();
		struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
		int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd >= 0)
			vsock_buffer(fd);
		if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
			say("connect to vsock %u:%u: %s", cid, port, strerror(errno));
			return 1;
		}
		return relay(fd, 0, 1);
	}
	unsigned port = (unsigned)strtoul(arg, NULL, 10);
	if (strcmp(mode, "--listen"))
		return serve_forever(port, echo_connection, 0); /* --echo */
	int lfd = vsock_listener(port); /* --listen: one connection, relayed to stdio */
	int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
	close(lfd);
	return fd < 0 ? 1 : relay(fd, 0, 1);
}

/* ---- main loop -------------------------------------------------------------- */


int main(int argc, char **argv)
{
	cfg.pid1 = getpid() == 1;
	if (!cfg.pid1 && argc == 3 && (!strcmp(argv[1], "--connect") || !strcmp(argv[1], "--listen") ||
				       !strcmp(argv[1], "--echo")))
		return tool(argv[1], argv[2]);
	if (!cfg.pid1 && argc >= 2 && !strcmp(argv[1], "--mount-9p"))
		return mount_shares(argc - 2, argv + 2);
	if (!cfg.pid1 && argc == 4 && !strcmp(argv[1], "--forward"))
		return serve_forever((unsigned)strtoul(argv[2], NULL, 10), forward_connection,
				     (unsigned)strtoul(argv[3], NULL, 10));
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--unix") && i + 1 < argc)
			cfg.unix_path = argv[++i];
		else if (!strcmp(argv[i], "--token") && i + 1 < argc)
			snprintf(cfg.token, sizeof cfg.token, "%s", argv[++i]);
		else if (!strcmp(argv[i], "--once"))
			cfg.once = 1;
		else if (!strcmp(argv[i], "--version")) {
			puts(AGENT_VERSION);
			return 0;
		} else
			return usage();
	}
	if (!cfg.pid1 && !cfg.unix_path)
		return usage();
	/* Keep 0, 1 and 2 taken (by /dev/null if nothing else): then every descriptor the
	 * agent opens is 3 or more, and setting up a command's stdio with dup2 can never
	 * overwrite one of them. */
	for (int fd = 0; fd < 3; fd++)
		if (fcntl(fd, F_GETFD) < 0)
			(void)open("/dev/null", O_RDWR);
	for (int i = 0; i < MAX_JOBS; i++)
		job_free(&jobs[i]);

	/* An ignored signal stays ignored across execve, and a process started in the
	 * background by a script (or by nohup, or a CI runner) inherits SIGINT and SIGQUIT
	 * ignored. Commands must start with every signal at its default, as under sshd, so
	 * the agent drops whatever it inherited, once, here; a vfork child then only has to
	 * undo the SIGPIPE below. (As PID 1 the kernel shields it from defaults anyway.) */
	for (int s = 1; s < NSIG; s++)
		if (s != SIGKILL && s != SIGSTOP)
			signal(s, SIG_DFL); /* EINVAL for the C library's own real-time signals: harmless */
	signal(SIGPIPE, SIG_IGN);
	sigset_t mask;
	sigemptyset(&mask);
	sigaddset(&mask, SIGCHLD);
	sigprocmask(SIG_BLOCK, &mask, NULL);
	sigfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
	if (cfg.pid1)
		pid1_setup();

	struct pollfd pfd[2 + 3 * MAX_JOBS];
	struct { struct job *j; int which; } owner[2 + 3 * MAX_JOBS];
	for (;;) {
		if (conn < 0) {
			if (cfg.once && ever_connected)
				return 0;
			connect_with_backoff();
			ever_connected = 1;
		}
		int n = 0;
		pfd[n++] = (struct pollfd){ sigfd, POLLIN, 0 };
		short ev = out_len ? POLLOUT : 0;
		if (out_len <= OUT_HIGH)
			ev |= POLLIN;
		pfd[n++] = (struct pollfd){ conn, ev, 0 };
		uint64_t now = now_ms(), next = 0;
		for (int i = 0; i < MAX_JOBS; i++) {
			struct job *j = &jobs[i];
			if (!j->id)
				continue;
			int can_out = j->out_credit && out_len + HDR + CHUNK <= OUT_HIGH;
			if (j->out_fd >= 0 && can_out) {
				owner[n] = (typeof(owner[0])){ j, 1 };
				pfd[n++] = (struct pollfd){ j->out_fd, POLLIN, 0 };
			}
			if (j->err_fd >= 0 && can_out) {
				owner[n] = (typeof(owner[0])){ j, 2 };
				pfd[n++] = (struct pollfd){ j->err_fd, POLLIN, 0 };
			}
			if (j->in_fd >= 0 && j->inq_len) {
				owner[n] = (typeof(owner[0])){ j, 0 };
				pfd[n++] = (struct pollfd){ j->in_fd, POLLOUT, 0 };
			}
			if (j->deadline_ms && (!next || j->deadline_ms < next))
				next = j->deadline_ms;
		}
		int timeout = -1;
		if (next)
			timeout = next > now ? (int)(next - now) : 0;
		if (poll(pfd, n, timeout) < 0 && errno != EINTR)
			continue;

		if (pfd[0].revents)
			reap();
		if (pfd[1].revents & (POLLIN | POLLHUP | POLLERR))
			read_conn();
		for (int i = 2; i < n && conn >= 0; i++) {
			struct job *j = owner[i].j;
			if (!pfd[i].revents || !j->id)
				continue;
			if (owner[i].which == 1 && j->out_fd == pfd[i].fd)
				pump_output(j, &j->out_fd, T_STDOUT);
			else if (owner[i].which == 2 && j->err_fd == pfd[i].fd)
				pump_output(j, &j->err_fd, T_STDERR);
			else if (owner[i].which == 0 && j->in_fd == pfd[i].fd && j->inq_len)
				pump_stdin(j);
		}
		now = now_ms();
		for (int i = 0; i < MAX_JOBS && conn >= 0; i++) {
			struct job *j = &jobs[i];
			if (!j->id)
				continue;
			if (j->deadline_ms && now >= j->deadline_ms) {
				/* The whole group: the leader may be gone while a child of it
				 * still holds the output pipes open. */
				kill(-j->pid, SIGKILL);
				j->timed_out = 1;
				j->deadline_ms = 0;
			}
			job_finish_if_done(j);
		}
		if (conn >= 0 && out_len)
			flush_out();
		if (poweroff_requested)
			power_off();
	}
}
