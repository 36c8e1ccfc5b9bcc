/*
 * neon_test_utils.c
 *	  SQL-callable helpers for the regression tests, on a stock PostgreSQL 15.
 *
 * test_consume_xids(n int4) RETURNS void
 *	  Advances the cluster's next transaction ID by at least n, far faster
 *	  than n committed transactions would.  Tests use it to reach states
 *	  that only exist after many XIDs (CLOG segments that autovacuum can
 *	  truncate, wraparound limits) without spending minutes on it.
 *
 *	  The IDs are handed out by the same allocator ordinary transactions
 *	  use (GetNewTransactionId), so everything that comes with a new XID
 *	  happens as usual: CLOG and SUBTRANS pages are extended and their
 *	  zero-page records WAL-logged, and autovacuum is signalled once the
 *	  XID passes the freeze limit.  The IDs are taken as subtransaction IDs
 *	  of the caller's transaction: nothing is ever written for them in
 *	  CLOG, so once the caller's transaction ends they count as aborted.
 *
 * The module is loaded by absolute path, never installed:
 *	  CREATE FUNCTION test_consume_xids(int) RETURNS void
 *	  AS '<repo>/pgxn/neon_test_utils/neon_test_utils.so', 'test_consume_xids'
 *	  LANGUAGE C STRICT;
 */
#include "postgres.h"

#include "access/transam.h"
#include "access/xact.h"
#include "fmgr.h"
#include "miscadmin.h"

PG_MODULE_MAGIC;

PG_FUNCTION_INFO_V1(test_consume_xids);

Datum
test_consume_xids(PG_FUNCTION_ARGS)
{
	int32		count = PG_GETARG_INT32(0);
	TransactionId stop_at;
	int64		taken = 0;

	if (count < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("test_consume_xids: count must not be negative, got %d", count)));

	/*
	 * Subtransaction IDs need a top-level XID to hang off: without one,
	 * GetNewTransactionId(true) would leave the backend advertising a
	 * subxid cache with no xid of its own.
	 */
	(void) GetTopTransactionId();

	/*
	 * Compare in modulo-2^32 order (the counter may wrap past the special
	 * IDs 0..2 during a long test), and step over the special IDs for the
	 * target: GetNewTransactionId never returns them.
	 */
	stop_at = ReadNextTransactionId() + (uint32) count;
	while (!TransactionIdIsNormal(stop_at))
		stop_at++;

	while (TransactionIdPrecedes(ReadNextTransactionId(), stop_at))
	{
		(void) GetNewTransactionId(true);
		/* A million IDs take a moment: let a cancel or a shutdown through. */
		if ((++taken & 0xFFFF) == 0)
			CHECK_FOR_INTERRUPTS();
	}

	PG_RETURN_VOID();
}
