-- 0015_clock_function: conveyor.now() in PL/pgSQL, whose plan lives as long
-- as the session instead of one statement.
--
-- Every scheduling decision reads the database clock through conveyor.now(),
-- and the hot statements mention it several times each (a claim eight times,
-- as `(SELECT conveyor.now())`, once per mention and statement). As an SQL
-- function that reads a table it cannot be inlined, and PostgreSQL plans the
-- body of a non-inlined SQL function again at each call site of each
-- statement: 16 us a call, measured, about 0.1 ms of every claim. PL/pgSQL
-- keeps the plan for the session: 3 us a call. Same body, same snapshot
-- (STABLE: it reads the clock table as of the calling statement), same
-- result.
CREATE OR REPLACE FUNCTION conveyor.now() RETURNS timestamptz
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
BEGIN
    RETURN coalesce(
        nullif(current_setting('conveyor_clock.fake_now', true), '')::timestamptz,
        (SELECT fake_now FROM conveyor.clock),
        statement_timestamp()
    );
END
$$;
