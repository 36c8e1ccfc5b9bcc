/*
 * neon_walredo.c
 *	  A WAL-redo helper for a stock PostgreSQL 15 binary.
 *
 * Loaded with shared_preload_libraries into "postgres --single", the module
 * hijacks the standalone backend from shmem_startup_hook: that hook runs at
 * the end of CreateSharedMemoryAndSemaphores(), after the shared buffer pool,
 * the lock tables and the process array exist but before InitPostgres(), so
 * no database is ever connected, no catalog is read and StartupXLOG() never
 * runs.  From there we finish the per-process initialisation ourselves
 * (InitProcess, BaseInit), pretend to be the startup process replaying WAL
 * (InRecovery), and serve the pageserver's B/P/A/G pipe protocol on stdin
 * until EOF.  The hook never returns.
 *
 * Output discipline: page images are the only thing written to the original
 * stdout.  We keep a private duplicate of that descriptor for responses and
 * point fd 1 at stderr, so any stray printf() ends up in the log stream
 * rather than in the middle of a page.  Log messages go to stderr as usual.
 *
 * Errors: there is no exception handler, so ERROR is promoted to FATAL by
 * elog.c; the message goes to stderr and the process exits with status 1.
 * The caller is expected to restart the helper.
 */
#include "postgres.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>
#include <sys/resource.h>

#include "access/xlog.h"
#include "access/xlog_internal.h"
#include "access/xlogutils.h"
#include "fmgr.h"
#include "libpq/pqsignal.h"
#include "miscadmin.h"
#include "port/pg_bswap.h"
#include "postmaster/postmaster.h"
#include "storage/bufmgr.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/procsignal.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timeout.h"
#include "utils/timestamp.h"

#include "neon_walredo.h"

PG_MODULE_MAGIC;

void		_PG_init(void);

bool		walredo_log_each_request = false;
bool		walredo_verify_crc = true;

static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Descriptor the page responses are written to (a dup of the original fd 1). */
static int	page_out_fd = -1;

/*
 * Largest payload we accept.  A WAL record is at most about 1 GB (the
 * XLogRecordMaxSize of PG15 is 1020 MB); leave room for the LSN in front.
 */
#define MAX_PAYLOAD_LEN		((int32) (1024 * 1024 * 1024))

/* Input buffering: stdin is read in large chunks. */
#define STDIN_BUF_SIZE		(128 * 1024)
static char *stdin_buf;
static size_t stdin_len = 0;	/* bytes held in stdin_buf */
static size_t stdin_pos = 0;	/* bytes of those already consumed */

/* The current message's payload, MAXALIGNed, reused across messages. */
static char *payload_buf = NULL;
static Size payload_cap = 0;

static MemoryContext message_context = NULL;

static void walredo_shmem_startup(void);
static void walredo_take_over(void);
static void walredo_main_loop(void) pg_attribute_noreturn();
static bool read_exact(char *dst, size_t count, bool eof_ok);
static void write_page_response(const char *page);


void
_PG_init(void)
{
	if (!process_shared_preload_libraries_in_progress)
		ereport(ERROR,
				(errmsg("neon_walredo must be loaded via shared_preload_libraries")));

	/*
	 * Taking over the process only makes sense in a standalone backend; in a
	 * postmaster it would replace the postmaster's main loop.
	 */
	if (IsPostmasterEnvironment || IsUnderPostmaster)
		ereport(ERROR,
				(errmsg("neon_walredo only runs in single-user mode"),
				 errhint("Start it as \"postgres --single -D <dir> -c shared_preload_libraries=<path>\".")));

	DefineCustomBoolVariable("neon_walredo.log_each_request",
							 "Writes one log line to stderr for every page request served.",
							 NULL,
							 &walredo_log_each_request,
							 false,
							 PGC_POSTMASTER,
							 0,
							 NULL, NULL, NULL);
	DefineCustomBoolVariable("neon_walredo.verify_crc",
							 "Checks the CRC of every WAL record before applying it.",
							 NULL,
							 &walredo_verify_crc,
							 true,
							 PGC_POSTMASTER,
							 0,
							 NULL, NULL, NULL);
	MarkGUCPrefixReserved("neon_walredo");

	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = walredo_shmem_startup;
}

/*
 * Runs as the last step of CreateSharedMemoryAndSemaphores() in the
 * standalone backend.  Never returns.
 */
static void
walredo_shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	walredo_take_over();
	walredo_main_loop();
}

/*
 * Finish what PostgresSingleUserMain()/PostgresMain() would have done, minus
 * everything that needs a database, then prepare for redo.
 */
static void
walredo_take_over(void)
{
	struct rlimit core_limit = {0, 0};
	struct sigaction sa;

	/* A crashing helper must not leave core files in the scratch directory. */
	(void) setrlimit(RLIMIT_CORE, &core_limit);

	PgStartTime = GetCurrentTimestamp();

	/* A PGPROC of our own, needed before LWLocks and buffer locks work. */
	InitProcess();

	/*
	 * Signals.  Termination requests must interrupt a blocking read() on
	 * stdin, so install die() without SA_RESTART; the read loop then sees
	 * EINTR and services the pending interrupt (exit via FATAL).
	 */
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = die;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGQUIT, &sa, NULL);
	pqsignal(SIGHUP, SIG_IGN);
	pqsignal(SIGPIPE, SIG_IGN);	/* a closed stdout shows up as EPIPE */
	pqsignal(SIGUSR1, procsignal_sigusr1_handler);
	pqsignal(SIGUSR2, SIG_IGN);
	pqsignal(SIGFPE, FloatExceptionHandler);
	pqsignal(SIGCHLD, SIG_DFL);
	InitializeTimeouts();

	/* File access, sync requests, smgr, buffer pool access, pgstat. */
	BaseInit();

	SetProcessingMode(NormalProcessing);

	/*
	 * Redo routines only work "in recovery".  reachedConsistency stays false,
	 * so a reference to a missing page is remembered instead of PANICking.
	 */
	InRecovery = true;

	/* Buffer pins need a resource owner. */
	CurrentResourceOwner = ResourceOwnerCreate(NULL, "neon_walredo");

	message_context = AllocSetContextCreate(TopMemoryContext,
											"neon_walredo message",
											ALLOCSET_DEFAULT_SIZES);
	stdin_buf = MemoryContextAlloc(TopMemoryContext, STDIN_BUF_SIZE);

	/* rm_startup of every resource manager, and our decoder state. */
	walredo_apply_init();

	/*
	 * Keep the real stdout for page images only; everything else that
	 * writes to fd 1 lands on stderr from now on.
	 */
	fflush(stdout);
	page_out_fd = fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, 3);
	if (page_out_fd < 0)
		ereport(FATAL,
				(errcode_for_file_access(),
				 errmsg("neon_walredo: could not duplicate stdout: %m")));
	if (dup2(STDERR_FILENO, STDOUT_FILENO) < 0)
		ereport(FATAL,
				(errcode_for_file_access(),
				 errmsg("neon_walredo: could not redirect stdout to stderr: %m")));

	PG_SETMASK(&UnBlockSig);

	ereport(LOG,
			(errmsg("neon_walredo: ready (pid %d, %d shared buffers)",
					MyProcPid, NBuffers)));
}

/* Make sure payload_buf can hold len bytes (plus a terminating zero). */
static void
ensure_payload_capacity(Size len)
{
	Size		want;

	if (len + 1 <= payload_cap)
		return;
	want = Max(payload_cap, (Size) 64 * 1024);
	while (want < len + 1)
		want *= 2;
	if (payload_buf)
		pfree(payload_buf);
	payload_buf = MemoryContextAllocExtended(TopMemoryContext, want, MCXT_ALLOC_HUGE);
	payload_cap = want;
}

static void
walredo_main_loop(void)
{
	PGAlignedBlock response;

	MemoryContextSwitchTo(message_context);

	for (;;)
	{
		char		hdr[5];
		char		msgtype;
		int32		len;
		uint32		netlen;

		CHECK_FOR_INTERRUPTS();

		/* Message header: type byte, then the length counting itself. */
		if (!read_exact(hdr, sizeof(hdr), true))
		{
			ereport(DEBUG1,
					(errmsg("neon_walredo: end of input, exiting")));
			proc_exit(0);
		}
		msgtype = hdr[0];
		memcpy(&netlen, &hdr[1], sizeof(netlen));
		len = (int32) pg_ntoh32(netlen);
		if (len < 4 || len - 4 > MAX_PAYLOAD_LEN)
			ereport(ERROR,
					(errcode(ERRCODE_PROTOCOL_VIOLATION),
					 errmsg("neon_walredo: invalid length %d in message of type 0x%02x",
							len, (unsigned char) msgtype)));
		len -= 4;
		ensure_payload_capacity(len);
		(void) read_exact(payload_buf, len, false);
		payload_buf[len] = '\0';

		switch (msgtype)
		{
			case 'B':			/* BeginRedoForBlock */
				walredo_begin(payload_buf, len);
				break;
			case 'P':			/* PushPage */
				walredo_push_page(payload_buf, len);
				break;
			case 'A':			/* ApplyRecord */
				walredo_apply_record(payload_buf, len);
				break;
			case 'G':			/* GetPage */
				walredo_get_page(payload_buf, len, response.data);
				write_page_response(response.data);
				break;
			case 'M':			/* MaskPage (our addition, for tests) */
				walredo_mask_page(payload_buf, len, response.data);
				write_page_response(response.data);
				break;
			default:
				ereport(ERROR,
						(errcode(ERRCODE_PROTOCOL_VIOLATION),
						 errmsg("neon_walredo: invalid message type 0x%02x",
								(unsigned char) msgtype)));
		}

		MemoryContextReset(message_context);
	}
}

/*
 * Read exactly count bytes from stdin.  Returns false only if eof_ok and the
 * input ended before the first byte; EOF anywhere else is an error.
 */
static bool
read_exact(char *dst, size_t count, bool eof_ok)
{
	size_t		done = 0;

	while (done < count)
	{
		size_t		n;

		if (stdin_pos == stdin_len)
		{
			ssize_t		rc;

			/* Large remainders go straight to the destination. */
			if (count - done >= STDIN_BUF_SIZE)
				rc = read(STDIN_FILENO, dst + done, count - done);
			else
				rc = read(STDIN_FILENO, stdin_buf, STDIN_BUF_SIZE);
			if (rc < 0)
			{
				if (errno == EINTR)
				{
					CHECK_FOR_INTERRUPTS();
					continue;
				}
				ereport(ERROR,
						(errcode_for_file_access(),
						 errmsg("neon_walredo: could not read from stdin: %m")));
			}
			if (rc == 0)
			{
				if (done == 0 && eof_ok)
					return false;
				ereport(ERROR,
						(errcode(ERRCODE_PROTOCOL_VIOLATION),
						 errmsg("neon_walredo: unexpected end of input inside a message")));
			}
			if (count - done >= STDIN_BUF_SIZE)
			{
				done += rc;
				continue;
			}
			stdin_len = rc;
			stdin_pos = 0;
		}
		n = Min(stdin_len - stdin_pos, count - done);
		memcpy(dst + done, stdin_buf + stdin_pos, n);
		stdin_pos += n;
		done += n;
	}
	return true;
}

static void
write_page_response(const char *page)
{
	size_t		done = 0;

	while (done < BLCKSZ)
	{
		ssize_t		rc = write(page_out_fd, page + done, BLCKSZ - done);

		if (rc < 0)
		{
			if (errno == EINTR)
			{
				CHECK_FOR_INTERRUPTS();
				continue;
			}
			ereport(ERROR,
					(errcode_for_file_access(),
					 errmsg("neon_walredo: could not write page to stdout: %m")));
		}
		done += rc;
	}
}
